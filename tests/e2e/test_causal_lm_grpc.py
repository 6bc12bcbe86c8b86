"""Causal-LM jobs end to end over gRPC, both modes: a coordinator and two client processes over loopback.

The model is a local ``.gguf`` file (a random 6-block Llama written the way llama.cpp writes one), so the
run also covers ``[model] path = "x.gguf"``: the coordinator converts it once, clients get the converted
model (lora) or an emulator of it (offsite) in their package. Data is text only: one client reads JSONL,
the other CSV, neither has a label. Asserted: ``val_perplexity`` every round, falling; ``final/`` loads
with ``AutoModelForCausalLM`` and generates with the KV cache on; in lora mode ``final/adapter/`` loads
with peft and equals the merged export; in offsite mode the package holds no tensor of a dropped block
and ``final/emulator/`` is exactly the package's emulator with the final adapter in place.
The same on SmolLM2 (``[model] path = "smollm2"``) is the ``long`` test at the end.
"""

from __future__ import annotations

import csv
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.checkpoint import Checkpointer
from emulator.exposure import state_digests
from emulator.layout import EmulatorLayout
from emulator.models import resolve_model_path
from localio.data import read_examples
from tests.e2e.harness import TOKENS, TRAIN, VALIDATION, start_client, start_coordinator, tail, wait_all
from tests.emulator.tiny_gguf import tiny_llama, write_tiny_gguf

pytestmark = pytest.mark.slow

JOB = """
[job]
name = "e2e-causal-@MODE@"
mode = "@MODE@"
rounds = @ROUNDS@
clients_per_round = 2
min_clients = 2
round_timeout_s = 900
seed = 0

[model]
path = "@MODEL@"
task = "causal-lm"
max_length = @MAXLEN@

[data]
validation = "validation.jsonl"

[train]
local_steps = @STEPS@
batch_size = 8
lr = @LR@

[lora]
r = 4
alpha = 8

[offsite]
adapter_layers = @ADAPTER@
keep = @KEEP@

[enrollment]
tokens_file = "tokens.txt"
"""


def _write_data(folder: Path, per_client: int, validation: int) -> tuple[Path, Path]:
    """Glosses without labels: client 0 as JSONL, client 1 as CSV; a text-only validation file."""
    texts = [e.text for e in read_examples(TRAIN, need_label=True)]
    random.Random(0).shuffle(texts)
    first, second = folder / "client0.jsonl", folder / "client1.csv"
    first.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:per_client]))
    with open(second, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([i, t] for i, t in enumerate(texts[per_client: 2 * per_client]))
    held_out = [e.text for e in read_examples(VALIDATION, need_label=True)[:validation]]
    (folder / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out))
    return first, second


def run_job(folder: Path, *, mode: str, model: str, rounds: int = 2, steps: int = 4, lr: float = 3e-3,
            adapter: int = 1, keep: int = 2, max_length: int = 32, per_client: int = 200, validation: int = 64,
            timeout_s: float = 900) -> Path:
    shards = _write_data(folder, per_client, validation)
    (folder / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    body = JOB
    for key, value in {"MODE": mode, "MODEL": model, "ROUNDS": rounds, "STEPS": steps, "LR": lr,
                       "ADAPTER": adapter, "KEEP": keep, "MAXLEN": max_length}.items():
        body = body.replace(f"@{key}@", str(value))
    job = folder / "job.toml"
    job.write_text(body)
    out = folder / "run"
    coordinator, address = start_coordinator(job, out)
    clients = [start_client(address, shards[i], TOKENS[i], folder / f"client{i}") for i in range(2)]
    codes = wait_all([coordinator, *clients], timeout_s=timeout_s)
    assert codes == [0, 0, 0], tail(folder / "run.coordinator.log") + tail(folder / "client0.log")
    return out


def check_metrics_and_final(out: Path, rounds: int) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds + 1))
    assert all(r["status"] == "ok" and r["completed_clients"] == 2 for r in records[1:])
    perplexities = [r["val_perplexity"] for r in records]
    assert all(p == p and 1 < p < 1e6 for p in perplexities), perplexities
    assert perplexities[-1] < perplexities[0], perplexities  # tuning on glosses lowers held-out perplexity
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = tokenizer(["dog:"], return_tensors="pt")
    generated = final.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    return records


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny-llama.gguf", tiny_llama(layers=6))


@pytest.fixture(autouse=True)
def _conversion_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_CACHE_DIR", str(tmp_path / "cache"))  # inherited by the processes


def test_lora_causal_lm_job_from_a_gguf_file(tmp_path: Path, tiny_gguf: Path) -> None:
    from peft import PeftModel

    out = run_job(tmp_path, mode="lora", model=str(tiny_gguf))
    check_metrics_and_final(out, rounds=2)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(tiny_gguf))  # the same cached conversion
    adapted = PeftModel.from_pretrained(base, str(out / "final" / "adapter")).merge_and_unload().eval()
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, final(input_ids=ids).logits, atol=1e-5)


def test_offsite_causal_lm_job_exports_the_tuned_emulator(tmp_path: Path, tiny_gguf: Path) -> None:
    out = run_job(tmp_path, mode="offsite", model=str(tiny_gguf), adapter=1, keep=2)
    check_metrics_and_final(out, rounds=2)
    layout = EmulatorLayout.load(out / "package" / "model")
    assert layout.dropped == [2, 3] and layout.num_emulator_blocks == 4

    # what clients download: no tensor of a dropped block, by name or by content
    full = AutoModelForCausalLM.from_pretrained(resolve_model_path(tiny_gguf))
    with tarfile.open(out / "package.tar") as tar:
        shipped_files = tar.getnames()
    assert "model/model.safetensors" in shipped_files
    shipped = load_file(str(out / "package" / "model" / "model.safetensors"))
    assert not any(f"layers.{i}." in name for name in shipped for i in range(4, 6))  # 4 emulator blocks
    dropped = {digest for name, digest in state_digests(full.state_dict()).items()
               if any(f"layers.{i}." in name for i in layout.dropped)}
    assert dropped and not dropped & set(state_digests(shipped).values())

    # final/emulator/ = the package's emulator with the final adapter blocks, nothing else changed
    emulator = AutoModelForCausalLM.from_pretrained(out / "final" / "emulator").eval()
    assert EmulatorLayout.load(out / "final" / "emulator").to_json() == layout.to_json()
    checkpoint = Checkpointer(out / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.round == 2
    exported = emulator.state_dict()
    adapter = checkpoint.global_state
    assert adapter and set(adapter) < set(exported)
    for name, tensor in exported.items():
        expected = adapter[name] if name in adapter else shipped[name]
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(adapter[name], shipped[name]) for name in adapter)  # the adapter did move
    tokenizer = AutoTokenizer.from_pretrained(out / "final" / "emulator")
    prompt = tokenizer(["dog:"], return_tensors="pt")
    assert emulator.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id).shape[1] == prompt["input_ids"].shape[1] + 5


@pytest.mark.long
@pytest.mark.parametrize("mode", ["lora", "offsite"])
def test_smollm2_causal_lm_job(tmp_path: Path, mode: str) -> None:
    """The embedded SmolLM2 in both modes (2+2 adapter, 6 of 26 middle blocks kept, no distillation):
    minutes on a CPU, so not in CI."""
    out = run_job(tmp_path, mode=mode, model="smollm2", rounds=2, steps=6, lr=1e-4 if mode == "offsite" else 1e-3,
                  adapter=2, keep=6, max_length=48, per_client=200, validation=100, timeout_s=3600)
    records = check_metrics_and_final(out, rounds=2)
    assert records[0]["val_perplexity"] < 400  # pretrained, not random (tens of thousands)
    if mode == "offsite":
        assert AutoModelForCausalLM.from_pretrained(out / "final" / "emulator").config.num_hidden_layers == 10
    print(mode, [round(r["val_perplexity"], 2) for r in records])
