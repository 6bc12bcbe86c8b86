"""Configuration of a SecAgg+ round, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

THRESHOLD_RANGE = "(0.5, 1]"


def valid_threshold(fraction: float) -> bool:
    """The unmasking threshold rule: more than half of each neighbourhood (see :class:`SecAggConfig`), at most all."""
    return 0.5 < fraction <= 1.0


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters the server fixes for one secure round.

    The threshold is a fraction of each *neighbourhood* (a client plus its
    neighbours in the SecAgg+ graph): that many members must survive to unmask.
    It must exceed 1/2, otherwise a curious server could collect enough shares
    of both secrets of one client (its self-mask seed from some neighbours, its
    mask key from others) and unmask that client's individual input.
    """

    clipping_range: float = field(
        default=8.0,
        metadata={"help": "inputs are clipped to [-clipping_range, clipping_range]"},
    )
    threshold: float = field(
        default=0.66,
        metadata={"help": "fraction of each neighbourhood needed to unmask, in (0.5, 1]"},
    )
    neighbourhood_size: int | None = field(
        default=None,
        metadata={
            "help": "clients per neighbourhood, the client itself included (odd, >= 3); "
            "None = 2*ceil(log2 n) + 1, capped at n (all clients)"
        },
    )

    def __post_init__(self) -> None:
        c = self.clipping_range
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"SecAggConfig.clipping_range must be a finite number > 0, got {c!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not valid_threshold(t):
            raise ValueError(f"SecAggConfig.threshold must be a fraction in {THRESHOLD_RANGE}, got {t!r}")
        k = self.neighbourhood_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 3 or k % 2 == 0):
            raise ValueError(
                "SecAggConfig.neighbourhood_size must be None or an odd integer >= 3 "
                f"(the client plus an even number of neighbours), got {k!r}"
            )
