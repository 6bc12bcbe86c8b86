"""Federated offsite-tuning end to end: a real coordinator and three fedsite-client processes over loopback.

MiniLM (the real pretrained weights), WordNet shards, offsite mode: the
clients hold only the emulator and train the adapter blocks and head; the
coordinator plugs the aggregate into the full model. Three numbers on the same
held-out examples: the plug-in (final/, the coordinator's metric), the emulator
alone (the same tuned adapter on the emulator the clients had) and the linear
probe (a head trained centrally on the frozen full model with the pooled client
data and as many examples as the clients saw in all). Offsite-tuning is worth
it only if the plug-in beats both: it beats the probe by far; against the
emulator alone it reaches parity on this 6-block model (within an example or
two of 400). The test asserts parity; when the plug-in does not come out
ahead it reports that as an expected failure rather than pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from coordinator.checkpoint import Checkpointer
from emulator.batching import encode, pad_id_of
from emulator.evaluation import TrainConfig, accuracy, linear_probe
from emulator.lora import load_trainable_state
from emulator.models import embedded_model_path, load_model
from emulator.package import load_trainable_model
from localio.data import read_examples, sample
from tests.e2e.harness import (
    TOKENS,
    TRAIN,
    VALIDATION,
    disjoint_shards,
    start_client,
    start_coordinator,
    tail,
    wait_all,
    write_job,
)

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS, LOCAL_STEPS, BATCH, PER_CLIENT, VAL = 3, 3, 30, 16, 600, 400
HEAD_LR = 5e-3

JOB = f"""
[job]
name = "e2e-offsite"
mode = "offsite"
rounds = {ROUNDS}
clients_per_round = {CLIENTS}
min_clients = {CLIENTS}
round_timeout_s = 600
seed = 0

[model]
path = "minilm"
task = "classification"
max_length = 48

[data]
validation = "@VALIDATION@"
validation_max_examples = {VAL}

[train]
local_steps = {LOCAL_STEPS}
batch_size = {BATCH}
lr = 5e-4
head_lr = {HEAD_LR}

[offsite]
adapter_layers = @ADAPTER@
keep = @KEEP@
distill_data = "public.txt"
distill_steps = @DISTILL@
distill_lr = 3e-4

[enrollment]
tokens_file = "tokens.txt"
"""

ADAPTER, KEEP, DISTILL = 2, 1, 300


def test_three_clients_tune_an_emulator_and_the_plug_in_beats_probe_and_emulator(tmp_path: Path) -> None:
    shards = disjoint_shards(tmp_path, clients=CLIENTS, per_client=PER_CLIENT)
    # the owner's public distillation text: training-split texts no client holds, labels dropped
    texts = [e.text for e in read_examples(TRAIN, need_label=True)[-4000:]]
    (tmp_path / "public.txt").write_text("\n".join(texts) + "\n")
    job = write_job(tmp_path, JOB.replace("@ADAPTER@", str(ADAPTER)).replace("@KEEP@", str(KEEP))
                    .replace("@DISTILL@", str(DISTILL)))
    out = tmp_path / "run"
    coordinator, address = start_coordinator(job, out, threads=2)  # listens, then distils; clients wait
    clients = [start_client(address, shards[i], TOKENS[i], tmp_path / f"client{i}") for i in range(CLIENTS)]
    codes = wait_all([coordinator, *clients], timeout_s=1200)
    assert codes == [0] * (CLIENTS + 1), tail(tmp_path / "run.coordinator.log") + tail(tmp_path / "client0.log")
    # distillation progress reads as log lines in the coordinator's log, not tqdm redraws
    coordinator_log = (tmp_path / "run.coordinator.log").read_text()
    assert f"distilling the emulator: step {DISTILL}/{DISTILL}" in coordinator_log and "\r" not in coordinator_log

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert all(r["status"] == "ok" and r["completed_clients"] == CLIENTS for r in records[1:])
    plug_in = records[-1]["val_accuracy"]

    # the same held-out examples the coordinator scored (validation_max_examples draws them with the job seed)
    examples = sample(read_examples(VALIDATION, need_label=True), VAL, 0)
    final = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    labels = list(final.config.id2label[i] for i in range(final.config.num_labels))
    label_id = {label: i for i, label in enumerate(labels)}
    pad = pad_id_of(tokenizer)
    val = encode(tokenizer, [e.text for e in examples], 48, [label_id[e.label] for e in examples])
    assert accuracy(final, val, pad_id=pad) == pytest.approx(plug_in, abs=1e-9)

    # emulator alone: the emulator the clients trained on, with the final adapter and head
    emulator, _, _ = load_trainable_model(out / "package")
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == ROUNDS
    load_trainable_state(emulator, checkpoint.global_state)
    emulator_alone = accuracy(emulator, val, pad_id=pad)

    # linear probe: a head on the frozen full model, the pooled client data, as many examples as the clients saw
    pooled = [e for shard in shards for e in read_examples(shard, need_label=True)]
    train = encode(tokenizer, [e.text for e in pooled], 48, [label_id[e.label] for e in pooled])
    full = load_model(embedded_model_path(), "classification", labels, seed=0)
    seen = ROUNDS * CLIENTS * LOCAL_STEPS * BATCH
    probe = linear_probe(full, train, TrainConfig(epochs=seen / len(train), batch_size=BATCH, head_lr=HEAD_LR),
                         pad_id=pad, progress=False)
    probe_accuracy = accuracy(probe, val, pad_id=pad)

    summary = (f"plug-in {plug_in:.3f}, emulator alone {emulator_alone:.3f}, linear probe {probe_accuracy:.3f} "
               f"(accuracy per round {[round(r['val_accuracy'], 3) for r in records]})")
    print(summary)
    assert plug_in > probe_accuracy + 0.10, summary
    # distillation closes the plug-in gap: without it (1+1, 2 of 4 kept) this run measured plug-in 0.470
    # vs emulator alone 0.515; with the 2+2 distilled emulator above, 0.4775 vs 0.475 (one example)
    assert plug_in >= emulator_alone - 0.02, summary
    if plug_in <= emulator_alone:
        # the target (beat the emulator alone), open: on 6-block MiniLM plug-in only reaches parity with the emulator
        # (experiments/offsite/RESULTS.md); this turns into a pass the day it beats it
        pytest.xfail(f"plug-in does not beat the emulator alone yet: {summary}")
