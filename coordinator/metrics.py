"""metrics.jsonl: one JSON object per round, appended and flushed as each round ends."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from localio.atomic import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as it is logged: non-finite numbers become null (JSON has no NaN)."""
    return {k: _clean(v) for k, v in record.items()}


class MetricsLog:
    """The job's per-round log; a crash can tear only its last line, which :meth:`read` drops."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Append one round's record and fsync, so a crash loses at most the round in progress."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(clean_record(record), sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every whole record in order; a torn last line (a crash mid-write) is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a crash ends the readable log
        return records

    def truncate_after(self, last_round: int) -> None:
        """On resume: drop records of rounds the checkpoint does not contain."""
        kept = [r for r in self.read() if int(r.get("round", -1)) <= last_round]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
