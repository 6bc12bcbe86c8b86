"""Lifecycle over real processes: an export that fails on a full disk, and --resume with a changed job file.

The coordinator's disk "fills up" right after the last round's checkpoint (tests/e2e/fsize_on_log.py): the
export fails in one line that says how to retry, leaves no partial folder and the checkpoint intact; a
resume with the model's shape changed, or with training settings changed, is refused naming the keys; the
same command with --resume then exports a final/ that plain transformers loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.checkpoint import Checkpointer
from simulations.harness.local_cluster import REPO, process_env
from tests.e2e.harness import TOKENS, disjoint_shards, start_client, start_coordinator, tail, wait_all, write_job

pytestmark = pytest.mark.slow

JOB = """
[job]
name = "e2e-lifecycle"
rounds = 1
clients_per_round = 2
min_clients = 2
round_timeout_s = 120
heartbeat_timeout_s = 10
sample_grace_s = 120
[model]
path = "@MODEL@"
max_length = 32
[data]
validation = "@VALIDATION@"
validation_max_examples = 100
[train]
local_steps = 2
batch_size = 8
lr = @LR@
[lora]
r = @RANK@
[enrollment]
tokens_file = "tokens.txt"
"""


def _job(folder: Path, model: Path, *, lr: str = "1e-2", rank: str = "4") -> Path:
    return write_job(folder, JOB.replace("@MODEL@", str(model)).replace("@LR@", lr).replace("@RANK@", rank))


def _serve(job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator", "serve", "--config", str(job), "--address",
                           "127.0.0.1:0", "--output-dir", str(out), "--linger-s", "0", *extra],
                          capture_output=True, text=True, env=process_env(), cwd=str(REPO), timeout=600)


def test_a_failed_export_keeps_the_checkpoint_and_resume_exports_again(tiny_bert_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path / "job", tiny_bert_dir)
    out = tmp_path / "run"
    shards = disjoint_shards(tmp_path, clients=2, per_client=40)
    coordinator, address = start_coordinator(
        job, out, program=("-m", "tests.e2e.fsize_on_log", "round 1/1 ok", str(1 << 20), "coordinator"))
    # the clients outlive the failed coordinator: they give up on it after 10 s instead of the harness's 60
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"c{i}", "--give-up-after-s", "10")
               for i in range(2)]
    codes = wait_all([coordinator, *clients], timeout_s=600)
    log = tail(tmp_path / "run.coordinator.log", 200)
    assert codes[0] == 2, log
    last = [line for line in log.splitlines() if line.strip()][-1]
    assert last.startswith("fedsite-coordinator: error: exporting") and "--resume to export again" in last, last
    assert "checkpoint of round 1 is intact" in last and "Traceback" not in log
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == 1

    shaped = _serve(_job(tmp_path / "rank", tiny_bert_dir, rank="8"), out, "--resume")
    assert shaped.returncode == 2 and "changes lora.r, which shape the model" in shaped.stderr, shaped.stderr
    trained = _serve(_job(tmp_path / "lr", tiny_bert_dir, lr="5e-4"), out, "--resume")
    assert trained.returncode == 2 and "changes train.lr" in trained.stderr and "--allow-job-change" in trained.stderr
    assert len(trained.stderr.strip().splitlines()) == 1, trained.stderr

    again = _serve(job, out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
