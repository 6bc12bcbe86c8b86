"""What a client says about its round, checked before the coordinator uses any of it.

A reply's config is JSON the client wrote: any key may hold any JSON value
(strings, nested objects, huge integers, and NaN or Infinity, which Python's
JSON parser accepts). :func:`read_report` turns it into a
:class:`ClientReport` of known fields, each checked for type, finiteness and
range, or raises :class:`ReplyRejected` naming the field. The engine reads
reports only, never ``reply.config``, so a hostile value cannot reach a
``float()`` call, a weighted mean or a metrics line. Unknown keys are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_EXAMPLES = 2**53  # integers beyond this do not survive a float; no client holds this many examples
MAX_REASON_CHARS = 500


class ReplyRejected(ValueError):
    """A reply whose report cannot be trusted; the message names the field and why."""


@dataclass(frozen=True)
class ClientReport:
    """The checked fields of a reply's config; None where the client did not send the field."""

    num_examples: int | None = None
    train_loss: float | None = None
    steps: int | None = None
    seconds_train: float | None = None
    epsilon: float | None = None
    epsilon_expected: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    update_norm: float | None = None
    secagg_weight: float | None = None
    reason: str = ""


# field -> (kind, lowest, highest)
_FIELDS: dict[str, tuple[type, float, float]] = {
    "num_examples": (int, 1, MAX_EXAMPLES),
    "train_loss": (float, -1e6, 1e6),
    "steps": (int, 0, 10**9),
    "seconds_train": (float, 0.0, 1e7),
    "epsilon": (float, 0.0, 1e9),
    "epsilon_expected": (float, 0.0, 1e9),
    "noise_multiplier": (float, 0.0, 1e9),
    "delta": (float, 0.0, 1.0),
    "update_norm": (float, 0.0, 1e30),
    "secagg_weight": (float, 0.0, 1.0),
}


def _number(name: str, value: Any, kind: type, lowest: float, highest: float) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyRejected(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ReplyRejected(f"{name} must be finite, got {value}")
    if kind is int and not isinstance(value, int):
        raise ReplyRejected(f"{name} must be an integer, got {_show(value)}")
    if not lowest <= value <= highest:
        raise ReplyRejected(f"{name} must be in [{lowest:g}, {highest:g}], got {_show(value)}")
    return value if kind is int else float(value)


def _show(value: Any) -> str:
    """A short, log-safe rendering of what the client sent."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_report(config: Mapping[str, Any]) -> ClientReport:
    """The report in a reply's config; ReplyRejected names the first field that fails its check."""
    if not isinstance(config, Mapping):
        raise ReplyRejected("the reply's config is not an object")
    values: dict[str, Any] = {}
    for name, (kind, lowest, highest) in _FIELDS.items():
        if name in config and config[name] is not None:
            values[name] = _number(name, config[name], kind, lowest, highest)
    reason = config.get("reason", "")
    if not isinstance(reason, str):
        raise ReplyRejected(f"reason must be text, got {type(reason).__name__}")
    values["reason"] = reason[:MAX_REASON_CHARS]
    return ClientReport(**values)
