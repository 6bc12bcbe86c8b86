"""JobView: the live state of one job, as the coordinator or the simulator already keeps it.

The job's code tells the view four things, each a plain attribute write that
never waits: what the preparation is doing (the same text waiting clients
are told), the engine once it exists, and at the end whether the job is done
or failed and why. Everything else is read when a page asks: the engine's
``current_round`` and ``activity`` attributes, the registry's display-safe copy
of its clients, and ``metrics.jsonl`` (re-read only when its size or mtime
changed). No lock is shared with the engine, so a slow or hostile page
cannot slow a round.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.dashboard.status import (
    JobInfo,
    Phase,
    build_status,
    engine_phase,
    finished_phase,
    preparing_phase,
)
from coordinator.metrics import MetricsLog

if TYPE_CHECKING:
    from coordinator.registry import ClientRegistry


class EngineState(Protocol):
    """The two attributes of :class:`coordinator.engine.RoundEngine` the dashboard reads."""

    current_round: int
    activity: str


class JobView:
    """The dashboard's read-only window on one job: the job writes plain attributes, pages read them.

    Nothing here takes a lock the engine holds, so any number of pages cannot slow a round.
    """
    def __init__(self, info: JobInfo, metrics_path: Path, *, source: str = "coordinator",
                 registry: ClientRegistry | None = None, refresh_s: float = 1.0) -> None:
        """``refresh_s``: the status document is rebuilt at most this often, however many pages poll."""
        self.info = info
        self.refresh_s = refresh_s
        self.metrics_path = metrics_path
        self.source = source
        self.registry = registry
        self._preparing = ""
        self._engine: EngineState | None = None
        self._outcome: tuple[str, str | None] | None = None  # ("done", None) | ("failed", reason)
        self._cache_lock = threading.Lock()  # among page requests only; the engine never takes it
        self._cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
        self._status: tuple[float, dict[str, Any]] | None = None  # (time.monotonic(), document)

    # -- written by the job ----------------------------------------------------------------

    def set_preparing(self, text: str) -> None:
        """The preparation's progress ("loading the model", "distilling the emulator: step 40/600, ...")."""
        self._preparing = text

    def attach(self, engine: EngineState, info: JobInfo | None = None) -> None:
        """The engine exists (the package is built); ``info`` replaces the settings (the simulator's overrides)."""
        if info is not None:
            self.info = info
        self._engine = engine

    def finish(self) -> None:
        """The job ran every round and exported: the page says done from now on."""
        self._outcome = ("done", None)

    def fail(self, reason: str) -> None:
        """The job stopped on an error; its first line is what the page shows."""
        self._outcome = ("failed", reason.strip().splitlines()[0] if reason.strip() else "unknown error")

    # -- read by pages ---------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl, re-read only when it changed (a torn last line is left for the next read)."""
        try:
            stat = self.metrics_path.stat()
        except FileNotFoundError:
            return []
        key = (stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            records = MetricsLog(self.metrics_path).read()
            self._cache = (key, records)
            return records

    def phase(self, records: list[dict[str, Any]], *, online: int | None = None) -> Phase:
        """What the job is doing now: finished, preparing, or the engine's round and activity."""
        outcome, engine = self._outcome, self._engine
        if outcome is not None:
            return finished_phase(self.info, records, failure=outcome[1] if outcome[0] == "failed" else None)
        if engine is None:
            return preparing_phase(self._preparing)
        return engine_phase(self.info, engine.current_round, engine.activity, online=online)

    def status(self) -> dict[str, Any]:
        """The document, built at most once per ``refresh_s`` however many pages poll: ten viewers cost
        what one does. The job's end is never held back."""
        cached, now = self._status, time.monotonic()
        if cached is not None and now - cached[0] < self.refresh_s and not self._outcome_changed(cached[1]):
            return cached[1]
        document = self._build()
        self._status = (now, document)
        return document

    def _outcome_changed(self, document: dict[str, Any]) -> bool:
        return self._outcome is not None and not document.get("final")

    def _build(self) -> dict[str, Any]:
        records = self.records()
        live = self.registry.clients_seen() if self.registry is not None else None
        online = None
        if live is not None:
            timeout = self.info.heartbeat_timeout_s
            online = sum(1 for c in live if c.seconds_since_seen is not None and c.seconds_since_seen <= timeout)
        return build_status(self.info, self.phase(records, online=online), records, live_clients=live,
                            source=self.source)
