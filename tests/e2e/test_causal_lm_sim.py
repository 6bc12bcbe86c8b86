"""Causal-LM offsite jobs in simulation (Flower's engine, Ray actors): a tiny GGUF Llama in CI, the canned
SmolLM2 job (``simulations/configs/offsite_smollm2.toml``) as a ``long`` test.

Text-only glosses split non-IID by their supersense (the label rides along, only the split uses it);
asserted: ``val_perplexity`` every round and falling, ``final/`` and ``final/emulator/`` load with
``AutoModelForCausalLM`` and generate with the KV cache on, and the exported emulator is the package's
emulator with the final adapter in place (nothing else moved).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.checkpoint import Checkpointer
from coordinator.config import load_job
from emulator.batching import encode, pad_id_of
from emulator.evaluation import perplexity
from emulator.layout import EmulatorLayout
from simulations.runner import SimulationOptions, run_job
from tests.e2e.harness import TRAIN, VALIDATION
from tests.emulator.tiny_gguf import tiny_llama, write_tiny_gguf

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

JOB = f"""
[job]
name = "sim-causal-offsite"
mode = "offsite"
rounds = 2
clients_per_round = 3
min_clients = 3
round_timeout_s = 600
seed = 0

[model]
path = "tiny.gguf"
task = "causal-lm"
max_length = 32

[data]
validation = "{VALIDATION}"
validation_max_examples = 64

[train]
local_steps = 4
batch_size = 8
lr = 3e-3

[offsite]
adapter_layers = 1
keep = 2

[simulation]
clients = 4
partition = "dirichlet"
alpha = 0.5
train_data = "{TRAIN}"
max_train_examples = 600
"""


def check_offsite_run(out: Path, rounds: int) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds + 1))
    assert all(r["status"] == "ok" for r in records[1:])
    perplexities = [r["val_perplexity"] for r in records]
    assert perplexities[-1] < perplexities[0], perplexities
    for folder in (out / "final", out / "final" / "emulator"):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer(["dog:"], return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True,
                                   pad_token_id=tokenizer.pad_token_id)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == rounds
    shipped = load_file(str(out / "package" / "model" / "model.safetensors"))
    exported = load_file(str(out / "final" / "emulator" / "model.safetensors"))
    assert set(exported) == set(shipped)
    for name, tensor in exported.items():
        assert torch.equal(tensor, checkpoint.global_state.get(name, shipped[name])), name
    layout = EmulatorLayout.load(out / "final" / "emulator")
    assert layout.to_json() == EmulatorLayout.load(out / "package" / "model").to_json()
    return perplexities


def test_simulated_offsite_causal_lm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_CACHE_DIR", str(tmp_path / "cache"))  # the Ray actors inherit it
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(layers=6))
    (tmp_path / "job.toml").write_text(JOB)
    out = tmp_path / "run"
    run_job(load_job(tmp_path / "job.toml"), out, SimulationOptions(progress=False, object_store_mb=100))
    check_offsite_run(out, rounds=2)
    partitions = json.loads((out / "partitions.json").read_text())
    assert sorted(map(len, partitions)) != [150] * 4  # non-IID: Dirichlet sizes, not equal shares


@pytest.mark.long
def test_canned_smollm2_offsite_job(tmp_path: Path) -> None:
    """The canned job as shipped (distillation included); prints the plug-in's and the tuned emulator's
    held-out perplexity on the job's validation draw."""
    from localio.data import read_examples, sample

    job = load_job(REPO / "simulations" / "configs" / "offsite_smollm2.toml")
    out = tmp_path / "run"
    run_job(job, out, SimulationOptions(progress=False))
    perplexities = check_offsite_run(out, rounds=job.job.rounds)
    texts = [e.text for e in sample(read_examples(VALIDATION, need_label=False), 200, 0)]
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    data = encode(tokenizer, texts, 48)
    plug_in = perplexity(AutoModelForCausalLM.from_pretrained(out / "final"), data, pad_id=pad_id_of(tokenizer))
    emulator = perplexity(AutoModelForCausalLM.from_pretrained(out / "final" / "emulator"), data,
                          pad_id=pad_id_of(tokenizer))
    print(f"per round {[round(p, 2) for p in perplexities]}; plug-in {plug_in:.2f}, emulator alone {emulator:.2f}")
    assert plug_in == pytest.approx(perplexities[-1], rel=1e-3)
    assert plug_in < 0.9 * perplexities[0]
