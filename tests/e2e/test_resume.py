"""The coordinator dying mid-round (no cleanup, as under SIGKILL) and restarted with --resume.

Clients are not told anything: they retry while the coordinator is down and
carry on when it is back. No completed round is lost, none is applied twice.
Tiny BERT (real tokenizer) so the whole story takes about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.checkpoint import Checkpointer
from tests.e2e.die_on_log import EXIT_CODE
from tests.e2e.harness import (
    TOKENS,
    disjoint_shards,
    start_client,
    start_coordinator,
    tail,
    wait_all,
    write_job,
)

pytestmark = pytest.mark.slow

JOB = """
[job]
name = "e2e-resume"
rounds = 4
clients_per_round = 3
min_clients = 2
round_timeout_s = 120
heartbeat_timeout_s = 20
seed = 0
[model]
path = "@MODEL@"
max_length = 32
[data]
validation = "@VALIDATION@"
validation_max_examples = 200
[train]
local_steps = 20
batch_size = 8
lr = 1e-2
[server]
optimizer = "fedadam"
lr = 0.01
[lora]
r = 4
[enrollment]
tokens_file = "tokens.txt"
"""


def test_sigkill_mid_round_then_resume_loses_nothing(tiny_bert_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, JOB.replace("@MODEL@", str(tiny_bert_dir)))
    shards = disjoint_shards(tmp_path, clients=3, per_client=80, seed=3)
    out = tmp_path / "run"
    # the first coordinator dies (as if SIGKILLed) while round 3 is out with the clients: inside the
    # log call for the round's first reply, before it answers that upload (rounds 1 and 2 are checkpointed).
    # A kill from here after seeing a client's log line could land after round 3 had finished.
    first, address = start_coordinator(job, out,
                                       program=("-m", "tests.e2e.die_on_log", "round 3: train reply from",
                                                "coordinator"))
    # the clients' retry window must outlast the restart on a slow machine
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"client{i}", "--give-up-after-s", "600")
               for i in range(3)]
    assert first.wait(timeout=300) == EXIT_CODE, tail(tmp_path / "run.coordinator.log")
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == 2
    second, _ = start_coordinator(job, out, "--resume", address=address)
    codes = wait_all([second, *clients], timeout_s=600)
    assert codes == [0, 0, 0, 0], tail(tmp_path / "run.coordinator.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]  # each round once, none lost, none repeated
    assert all(r["status"] == "ok" for r in records[1:])
    final = Checkpointer(out / "checkpoints").latest()
    assert final is not None and final.round == 4
    assert (out / "final" / "model.safetensors").exists()
    assert "resumed after round 2" in (tmp_path / "run.coordinator.log").read_text()
    # the clients noticed the outage and carried on by themselves
    assert "UNAVAILABLE" in (tmp_path / "client0.log").read_text()


def test_output_dir_that_cannot_be_written_is_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from simulations.harness.local_cluster import REPO, process_env

    job = write_job(tmp_path, JOB.replace("@MODEL@", "minilm"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    proc = subprocess.run([sys.executable, "-m", "coordinator", "serve", "--config", str(job), "--output-dir",
                           str(blocker / "run"), "--address", "127.0.0.1:0"],
                          capture_output=True, text=True, env=process_env(), cwd=str(REPO), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fedsite-coordinator: error:")
    assert "Traceback" not in proc.stderr
