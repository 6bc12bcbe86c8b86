"""A secure round over real gRPC with 5 real client processes, one killed after masking, then restarted.

One client dies (as if SIGKILLed) right after its masked input is accepted:
its masked update is already in; the survivors' Shamir shares let the
coordinator remove its self-mask, so the round completes and the sum still
includes it. The dead client is then restarted from its state folder (its saved
session, no secure-aggregation secrets) and takes part in round 2: set up
afresh, while the survivors use the keys they made ahead. Tiny BERT (real
tokenizer) so it runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.die_on_log import EXIT_CODE
from tests.e2e.harness import (
    TOKENS,
    disjoint_shards,
    start_client,
    start_coordinator,
    tail,
    wait_all,
    wait_for_text,
    write_job,
)

pytestmark = pytest.mark.slow

JOB = """
[job]
name = "e2e-secure"
rounds = 2
clients_per_round = 5
min_clients = 3
round_timeout_s = 120
heartbeat_timeout_s = 6
sample_grace_s = 120
seed = 0
[model]
path = "@MODEL@"
max_length = 32
[data]
validation = "@VALIDATION@"
validation_max_examples = 200
[train]
local_steps = 3
batch_size = 8
lr = 1e-2
[lora]
r = 4
[privacy.client_dp]
enabled = true
clip_norm = 0.5
noise_multiplier = 0.5
distributed = true
[privacy.secure_aggregation]
enabled = true
threshold = 0.66
[enrollment]
tokens_file = "tokens.txt"
"""


def test_secure_round_with_a_client_killed_after_masking(tiny_bert_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, JOB.replace("@MODEL@", str(tiny_bert_dir)))
    shards = disjoint_shards(tmp_path, clients=5, per_client=60, seed=2)
    out = tmp_path / "run"
    coordinator, address = start_coordinator(job, out)
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"client{i}") for i in range(4)]
    # the victim dies inside the log call that says its masked input was accepted: a kill from here
    # after seeing that line could land after it had also sent its unmasking shares
    victim = start_client(address, shards[4], TOKENS[4], tmp_path / "client4",
                          program=("-m", "tests.e2e.die_on_log", "round 1: secagg/masked_input reply accepted",
                                   "client"))
    # restarted once round 1 is over, so that round sees the victim only as dead (not as a stranger at unmask)
    ended = wait_for_text(tmp_path / "run.coordinator.log", "round 1/2 ", timeout_s=600)  # ok or failed
    if not ended or "round 1/2 ok" not in (tmp_path / "run.coordinator.log").read_text():
        for proc in (coordinator, *clients, victim):
            proc.kill()
        raise AssertionError(tail(tmp_path / "run.coordinator.log") + tail(tmp_path / "client4.log"))
    restarted = start_client(address, shards[4], TOKENS[4], tmp_path / "client4",
                             log_path=tmp_path / "client4.restarted.log")
    codes = wait_all([coordinator, *clients, victim, restarted], timeout_s=600)
    logs = [tmp_path / name for name in ("run.coordinator.log", "client4.log", "client4.restarted.log")]
    assert codes == [0, 0, 0, 0, 0, EXIT_CODE, 0], "".join(tail(path) for path in logs)
    records = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    first = records[1]
    assert first["status"] == "ok", first
    assert first["completed_clients"] == 5  # the victim's masked update is in the sum
    assert first["dropped_clients"] == 1 and "heartbeat" in next(iter(first["drop_reasons"].values()))
    assert 0 < first["epsilon_client"] < records[2]["epsilon_client"]
    # round 2 has all five again: the survivors keyed ahead at unmask, the restarted victim (which never got
    # there) set up afresh
    second = records[2]
    assert second["status"] == "ok" and second["completed_clients"] == 5, second
    assert second["secagg_keyed_clients"] == 4, second
    log = (tmp_path / "run.coordinator.log").read_text()
    assert "Traceback" not in log
