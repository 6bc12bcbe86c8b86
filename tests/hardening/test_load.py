"""Twenty concurrent clients against the real coordinator in one round (``simulations.bench.load`` runs 200).

Every client must end where its role says: the good ones completed, the one
that vanishes after fetching its task dropped by the heartbeat timeout, the
one that uploads wrong shapes rejected by the engine; nobody unaccounted for,
and the coordinator logs no error.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench.load import run_load


def test_twenty_concurrent_clients_are_all_accounted_for(tiny_bert_dir: Path, tmp_path: Path) -> None:
    report = run_load(20, tmp_path, model=tiny_bert_dir, drop_fraction=0.05, reject_fraction=0.05,
                      heartbeat_timeout_s=10.0)
    summary = report.summary()
    assert report.errors == []
    assert summary["status"] == "ok"
    assert {k: len(v) for k, v in report.accounting().items()} == {
        "good->completed": 18, "drop->dropped": 1, "reject->rejected": 1}
    assert summary["sampled"] == 20 and summary["completed"] == 18 and summary["dropped_or_rejected"] == 2
    # what the coordinator wrote agrees with what the clients saw
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["completed_clients"] == 18 and record["status"] == "ok"
    assert sum(r.outcome == "uploaded" for r in report.results) == 19  # the rejected one uploaded too
    uploads = report.latency_ms()["Upload"]
    assert uploads["n"] == 19 and 0 < uploads["p50"] <= uploads["p99"]
    assert "Traceback" not in (tmp_path / "run" / "coordinator.log").read_text()
    # the round waited for the vanished client's heartbeat timeout, and not for the 600 s round deadline
    assert 10.0 <= report.round_seconds < 120
