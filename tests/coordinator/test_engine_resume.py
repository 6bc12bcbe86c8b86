"""Crash-resume at the round engine's two awkward moments, with the real engine, tiny BERT and the
in-process driver: killed in round 1 before any checkpoint (round 0's record must not appear twice), and
killed between a round's checkpoint and its metrics line (the line must not be lost)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from client.runtime import ClientRuntime
from coordinator.config import parse_job
from coordinator.job import prepare_job
from coordinator.metrics import MetricsLog
from localio.data import read_examples, write_jsonl
from protos.codec import Message
from simulations.harness.inprocess import InProcessDriver

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


class Crash(Exception):
    """Stands for the process dying at this point."""


def _table(model_dir: Path, tmp: Path) -> dict[str, Any]:
    rows = read_examples(VALIDATION, need_label=True)
    random.Random(0).shuffle(rows)
    write_jsonl(tmp / "val.jsonl", rows[:100])
    return {
        "job": {"name": "t", "rounds": 2, "clients_per_round": 3, "min_clients": 3, "seed": 0},
        "model": {"path": str(model_dir), "max_length": 32},
        "data": {"validation": str(tmp / "val.jsonl"), "validation_max_examples": 0},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 1e-2},
        "lora": {"r": 4},
    }


def _driver(package_dir: Path, tmp: Path, drop: Any = None) -> InProcessDriver:
    rows = read_examples(VALIDATION, need_label=True)[2000:]
    clients = {f"c{i}": ClientRuntime.from_package(package_dir, rows[i * 30:(i + 1) * 30], state_dir=tmp / f"c{i}")
               for i in range(3)}
    return InProcessDriver(clients, drop=drop)


def _rounds(out: Path) -> list[int]:
    return [int(r["round"]) for r in MetricsLog(out / "metrics.jsonl").read()]


def test_killed_in_round_one_before_any_checkpoint_keeps_one_round_zero(tiny_bert_dir: Path, tmp_path: Path) -> None:
    table, out = _table(tiny_bert_dir, tmp_path), tmp_path / "out"
    first = prepare_job(parse_job(table, tmp_path), out)

    def crash_in_round_1(client_id: str, message: Message) -> bool:
        raise Crash

    with pytest.raises(Crash):
        first.engine.run(_driver(first.package.folder, tmp_path, crash_in_round_1))
    assert _rounds(out) == [0]
    resumed = prepare_job(parse_job(table, tmp_path), out, resume=True)
    assert resumed.engine.completed_rounds == 0
    resumed.engine.run(_driver(resumed.package.folder, tmp_path))
    assert _rounds(out) == [0, 1, 2]


def test_killed_between_checkpoint_and_metrics_line_loses_no_record(tiny_bert_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    table, out = _table(tiny_bert_dir, tmp_path), tmp_path / "out"
    first = prepare_job(parse_job(table, tmp_path), out)
    append = MetricsLog.append

    def append_then_die_at_round_1(self: MetricsLog, record: dict[str, Any]) -> None:
        if record["round"] == 1:
            raise Crash
        append(self, record)

    monkeypatch.setattr(MetricsLog, "append", append_then_die_at_round_1)
    with pytest.raises(Crash):
        first.engine.run(_driver(first.package.folder, tmp_path))
    monkeypatch.setattr(MetricsLog, "append", append)
    assert _rounds(out) == [0]  # round 1's checkpoint was written, its metrics line was not
    resumed = prepare_job(parse_job(table, tmp_path), out, resume=True)
    assert resumed.engine.completed_rounds == 1
    assert _rounds(out) == [0, 1]  # restored from the checkpoint on resume
    restored = MetricsLog(out / "metrics.jsonl").read()[1]
    assert restored["status"] == "ok" and restored["completed_clients"] == 3 and "val_accuracy" in restored
    resumed.engine.run(_driver(resumed.package.folder, tmp_path))
    assert _rounds(out) == [0, 1, 2]
