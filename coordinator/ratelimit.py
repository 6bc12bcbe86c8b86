"""Per-key token buckets: how the coordinator keeps one client (or one address) from flooding it.

A bucket holds up to ``burst`` calls and refills at ``rate`` calls per
second; a call that finds it empty is refused (the servicer answers
RESOURCE_EXHAUSTED, which clients treat as "back off and retry"). Idle full
buckets are forgotten once there are many, so keys an attacker invents do not
grow memory without bound.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per key (see the module); thread-safe, memory bounded by ``max_keys``."""
    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate > 0 and burst >= 1 are required, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        return bucket

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < full_after}

    def allow(self, key: str) -> bool:
        """Take one call from ``key``'s bucket; False if it is empty."""
        with self._lock:
            bucket = self._refilled(key, time.monotonic())
            if bucket.tokens < 1:
                return False
            bucket.tokens -= 1
            return True

    def exhausted(self, key: str) -> bool:
        """True if ``key``'s bucket is empty (without taking from it)."""
        with self._lock:
            return self._refilled(key, time.monotonic()).tokens < 1
