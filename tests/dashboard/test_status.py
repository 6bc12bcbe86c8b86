"""The status document from records, settings and live state: phases, the client table, ε, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.config import load_job
from coordinator.dashboard.status import (
    JobInfo,
    build_status,
    client_table,
    engine_phase,
    finished_phase,
    preparing_phase,
)
from coordinator.registry import ClientSeen

INFO = JobInfo(name="j", mode="lora", rounds=3, clients_per_round=2, min_clients=2, heartbeat_timeout_s=30,
               local_dp=True, local_budget=4.0, local_delta=1e-5)


def records() -> list[dict[str, Any]]:
    """Round 1 ok; round 2: b drops, c declines for its budget; round 3 fails for lack of clients."""
    return [
        {"round": 0, "val_accuracy": 0.1, "seconds": 1.0},
        {"round": 1, "status": "ok", "sampled_clients": 2, "completed_clients": 2,
         "sampled_client_ids": ["a", "b"], "completed_client_ids": ["a", "b"], "dropped_clients": 0,
         "val_accuracy": 0.3, "train_loss": 2.0, "epsilon_local": {"a": 1.0, "b": 1.5}, "epsilon_local_max": 1.5},
        {"round": 2, "status": "ok", "sampled_clients": 3, "completed_clients": 1,
         "sampled_client_ids": ["a", "b", "c"], "completed_client_ids": ["a"], "dropped_clients": 2,
         "drop_reasons": {"b": "silent for 31s (heartbeat timeout)",
                          "c": "declined: privacy budget exhausted: 4.2 > 4"},
         "budget_exhausted_clients": ["c"], "val_accuracy": 0.4, "train_loss": 1.5,
         "epsilon_local": {"a": 2.0, "c": 3.9}, "epsilon_local_max": 3.9},
        {"round": 3, "status": "failed", "failure": "only 1 clients available, min_clients is 2",
         "sampled_clients": 1, "completed_clients": 0, "sampled_client_ids": ["a"], "completed_client_ids": [],
         "dropped_clients": 0, "val_accuracy": 0.4},
    ]


def test_preparation_text_becomes_a_phase_with_progress() -> None:
    phase = preparing_phase("distilling the emulator: step 240/600, loss 0.125")
    assert (phase.status, phase.step, phase.steps) == ("distilling", 240, 600)
    assert phase.text == "distilling the emulator: step 240 of 600"
    assert preparing_phase("loading the model").status == "preparing"
    assert preparing_phase("").text == "preparing"


@pytest.mark.parametrize(("round_id", "activity", "status", "text"), [
    (2, "waiting for clients", "waiting_for_clients", "round 2 of 3: waiting for clients (1 online, 2 needed)"),
    (2, "train", "running", "round 2 of 3: training"),
    (2, "masked_input", "running", "round 2 of 3: training (secure aggregation)"),
    (2, "share_keys", "running", "round 2 of 3: secure aggregation: share keys"),
    (3, "evaluating", "running", "round 3 of 3: evaluating"),
    (0, "evaluating", "running", "evaluating the initial model"),
    (3, "done", "running", "all 3 rounds run: exporting the final model"),
])
def test_engine_activities_read_as_sentences(round_id: int, activity: str, status: str, text: str) -> None:
    phase = engine_phase(INFO, round_id, activity, online=1)
    assert (phase.status, phase.text, phase.round, phase.activity) == (status, text, round_id, activity)


def test_finished_phases_say_done_stopped_or_failed_with_the_reason() -> None:
    done = finished_phase(INFO, records())
    assert done.status == "done" and done.text == "done: 3 rounds (2 ok, 1 failed); val_accuracy 0.4000"
    stopped = finished_phase(INFO, records()[:3])
    assert stopped.status == "stopped" and stopped.text.startswith("stopped after round 2 of 3 (2 ok)")
    failed = finished_phase(INFO, records()[:2], failure="cannot bind 0.0.0.0:50051")
    assert failed.status == "failed" and failed.text == "failed: cannot bind 0.0.0.0:50051"


def test_client_table_counts_every_outcome_and_joins_the_registry() -> None:
    live = [ClientSeen("a", "party-a", 1000.0, 2.0), ClientSeen("d", "party-d", 1001.0, 99.0),
            ClientSeen("e", "party-e", 1002.0, None)]
    rows = {r["id"]: r for r in client_table(INFO, records(), live)}
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    a, b, c, d, e = (rows[k] for k in "abcde")
    assert (a["sampled"], a["completed"], a["dropped"], a["declined_budget"], a["epsilon"]) == (3, 2, 0, 0, 2.0)
    assert (b["sampled"], b["completed"], b["dropped"], b["epsilon"]) == (2, 1, 1, 1.5)
    assert b["last_drop"] == {"round": 2, "reason": "silent for 31s (heartbeat timeout)"}
    assert (c["dropped"], c["declined_budget"], c["epsilon"]) == (0, 1, 3.9)
    assert a["online"] is True and d["online"] is False and e["online"] is False and e["last_seen_s"] is None
    assert a["name"] == "party-a" and a["enrolled"] and not b["enrolled"]  # b: in records, not in this registry
    assert b["online"] is None  # unknown to the registry: neither online nor offline
    report_rows = {r["id"]: r for r in client_table(INFO, records(), live, liveness=False)}
    assert report_rows["a"]["online"] is None and report_rows["a"]["last_seen_s"] is None


def test_virtual_clients_of_a_simulation_are_listed_before_they_are_sampled() -> None:
    info = JobInfo(name="sim", mode="lora", rounds=1, virtual_clients=3)
    record = {"round": 1, "status": "ok", "sampled_client_ids": ["client-00001"],
              "completed_client_ids": ["client-00001"]}
    rows = client_table(info, [record], None)
    assert [r["id"] for r in rows] == ["client-00000", "client-00001", "client-00002"]
    assert [r["sampled"] for r in rows] == [0, 1, 0] and all(r["online"] is None for r in rows)


def test_status_document_carries_the_records_and_the_documented_fields() -> None:
    rows = records()
    status = build_status(INFO, engine_phase(INFO, 3, "train"), rows,
                          live_clients=[ClientSeen("a", "", 0.0, 1.0)], now=123.0)
    for key in ("job", "mode", "status", "round", "rounds", "clients", "metrics", "epsilon"):
        assert key in status, key
    assert status["metrics"] == rows and status["updated_at"] == 123.0
    assert (status["round"], status["completed_rounds"], status["final"]) == (3, 3, False)
    assert status["metric"] == "val_accuracy" and status["metric_higher_is_better"]
    assert status["epsilon"]["local"] == {"enabled": True, "budget": 4.0, "delta": 1e-5, "max": 3.9,
                                          "clients": {"a": 2.0, "b": 1.5, "c": 3.9}}
    assert status["epsilon"]["client"] == {"enabled": False}
    assert status["last_failure"] == {"round": 3, "reason": "only 1 clients available, min_clients is 2"}
    assert status["clients_summary"] == {"enrolled": 1, "online": 1, "per_round": 2, "min": 2}


@pytest.mark.parametrize("local_dp", [
    "noise_multiplier = 1.0",
    "noise_multiplier = 1.0\nmax_epsilon = 3.5",
    "target_epsilon = 2.5",
    "target_epsilon = 2.5\nmax_epsilon = 6.0",
])
def test_budget_from_a_saved_config_is_the_one_the_job_enforces(tmp_path: Path, local_dp: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f"[job]\nname = \"b\"\n[privacy.local_dp]\nenabled = true\ndelta = 1e-6\n{local_dp}\n")
    config = load_job(job)
    info = JobInfo.from_config(config)  # through to_dict(), as job.toml.json stores it
    assert info.local_dp and info.local_budget == config.privacy.local_dp.budget
    assert info.local_delta == 1e-6 and info.name == "b"
