"""Federated LoRA end to end: a real coordinator and real fedsite-client processes over loopback.

MiniLM (the real pretrained weights) on disjoint WordNet shards. These runs
take minutes on two CPU cores; they are the proof that a user's three
commands give back a better model in the formats transformers and peft load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from coordinator.checkpoint import Checkpointer
from emulator.lora import load_trainable_state
from emulator.package import load_trainable_model
from localio.data import read_examples, sample
from tests.e2e.die_on_log import EXIT_CODE
from tests.e2e.harness import (
    TOKENS,
    VALIDATION,
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
name = "e2e-lora"
mode = "lora"
rounds = {rounds}
clients_per_round = 3
min_clients = 2
round_timeout_s = 300
heartbeat_timeout_s = {heartbeat}
sample_grace_s = 120
seed = 0

[model]
path = "minilm"
task = "classification"
max_length = 48

[data]
validation = "@VALIDATION@"
validation_max_examples = 400

[train]
local_steps = {steps}
batch_size = 16
lr = 3e-3

[lora]
r = 8
alpha = 16

[enrollment]
tokens_file = "tokens.txt"
"""


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_three_clients_three_rounds_improve_and_export(tmp_path: Path) -> None:
    job = write_job(tmp_path, JOB.format(rounds=3, heartbeat=60, steps=20))
    shards = disjoint_shards(tmp_path, clients=3, per_client=500)
    out = tmp_path / "run"
    coordinator, address = start_coordinator(job, out)
    # client 2 has its own copy of the base model: it downloads the package without the weights
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"client{i}",
                            *(("--base-model", "minilm") if i == 2 else ())) for i in range(3)]
    codes = wait_all([coordinator, *clients], timeout_s=900)
    assert codes == [0, 0, 0, 0], tail(tmp_path / "run.coordinator.log") + tail(tmp_path / "client2.log")
    assert "base model from minilm matches the job's fingerprint" in (tmp_path / "client2.log").read_text()
    assert (out / "package-slim.tar").stat().st_size < 0.05 * (out / "package.tar").stat().st_size

    records = _metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["completed_clients"] == 3 and r["status"] == "ok" for r in records[1:])
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in records[1:])
    first, last = records[0]["val_accuracy"], records[-1]["val_accuracy"]
    assert last > first + 0.10, f"accuracy {first:.3f} -> {last:.3f}"

    # final/ loads with plain transformers and predicts what the coordinator's model predicts
    final = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert len(final.config.id2label) == 45 and "noun.animal" in final.config.id2label.values()
    coordinator_model, _, _ = load_trainable_model(out / "package")
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == 3
    load_trainable_state(coordinator_model, checkpoint.global_state)
    examples = sample(read_examples(VALIDATION, need_label=True), 400, 0)
    batch = tokenizer([e.text for e in examples], truncation=True, max_length=48, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported_logits = final(**batch).logits
        in_memory_logits = coordinator_model(**batch).logits
    torch.testing.assert_close(exported_logits, in_memory_logits, atol=1e-4, rtol=0)
    assert torch.equal(exported_logits.argmax(-1), in_memory_logits.argmax(-1))
    labels = torch.tensor([final.config.label2id[e.label] for e in examples])
    accuracy = int((exported_logits.argmax(-1) == labels).sum()) / len(examples)
    assert accuracy == pytest.approx(last, abs=1e-9)

    # final/adapter/ loads with peft over the base model
    base = AutoModelForSequenceClassification.from_pretrained(out / "package" / "model")
    adapted = PeftModel.from_pretrained(base, str(out / "final" / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, exported_logits, atol=1e-4, rtol=0)


def test_client_killed_mid_round_the_round_completes_with_the_others(tmp_path: Path) -> None:
    job = write_job(tmp_path, JOB.format(rounds=1, heartbeat=8, steps=40))
    shards = disjoint_shards(tmp_path, clients=3, per_client=300, seed=1)
    out = tmp_path / "run"
    coordinator, address = start_coordinator(job, out)
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"client{i}") for i in range(2)]
    # the victim dies (as under SIGKILL) the moment it has its round-1 task, before it can reply
    victim = start_client(address, shards[2], TOKENS[2], tmp_path / "client2",
                          program=("-m", "tests.e2e.die_on_log", "round 1: train", "client"))
    codes = wait_all([coordinator, *clients, victim], timeout_s=600)
    assert codes == [0, 0, 0, EXIT_CODE], tail(tmp_path / "run.coordinator.log") + tail(tmp_path / "client2.log")
    (record,) = [r for r in _metrics(out) if r["round"] == 1]
    assert record["status"] == "ok"
    assert record["sampled_clients"] == 3 and record["completed_clients"] == 2 and record["dropped_clients"] == 1
    assert "heartbeat" in next(iter(record["drop_reasons"].values()))
    assert (out / "final" / "model.safetensors").exists()
