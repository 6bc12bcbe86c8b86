"""Offsite mode's package: what a client downloads holds none of the dropped blocks.

Built through the coordinator's own job preparation, on a tiny BERT with the
real tokenizer; the check is by hash over every tensor in every file of the
package tar (what FetchPackage streams) and of a round's task message.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from coordinator.config import parse_job
from coordinator.job import prepare_job
from emulator.exposure import tensor_digest
from emulator.layout import EmulatorLayout
from emulator.models import load_model
from localio.data import read_examples, write_jsonl
from protos.codec import decode_message, encode_message

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def test_the_package_and_round_messages_carry_no_dropped_block(tiny_bert_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "val.jsonl", read_examples(VALIDATION, need_label=True)[:100])
    config = parse_job({
        "job": {"name": "off", "mode": "offsite", "rounds": 1, "clients_per_round": 2, "min_clients": 1},
        "model": {"path": str(tiny_bert_dir), "max_length": 32},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "offsite": {"adapter_layers": 1, "keep": 1},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    layout = EmulatorLayout.load(job.package.folder / "model")
    assert layout.adapter_full_indices == [0, 3] and layout.kept_middle in ([1], [2])
    dropped = sorted(set(range(4)) - set(layout.adapter_full_indices) - set(layout.kept_middle))
    assert dropped

    full = load_model(tiny_bert_dir, "classification", job.package.spec.labels, seed=0)
    prefix = "bert.encoder.layer."
    in_dropped = {name for name in full.state_dict() if any(name.startswith(f"{prefix}{i}.") for i in dropped)}
    elsewhere = {tensor_digest(t) for name, t in full.state_dict().items() if name not in in_dropped}
    # freshly initialised LayerNorms and biases are identical in every block: only tensors that
    # exist nowhere else in the model identify a dropped block
    dropped_digests = {tensor_digest(full.state_dict()[name]) for name in in_dropped} - elsewhere
    kept_digests = {tensor_digest(t) for name, t in full.state_dict().items()
                    if name.startswith(f"{prefix}{layout.adapter_full_indices[0]}.")}
    assert dropped_digests

    shipped: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(job.package.blob)) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".safetensors"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                shipped |= {tensor_digest(t) for t in load_safetensors(data).values()}
    message = decode_message(encode_message(job.engine.train_message(1, 2)))
    round_digests = {tensor_digest(t) for t in message.tensors.values()}

    assert shipped and kept_digests <= shipped  # the check can see blocks that do ship...
    assert not (dropped_digests & shipped)  # ...and none of the dropped ones is in the package
    assert not (dropped_digests & round_digests)
    # a round carries the adapter blocks (emulator numbering) and the head, nothing of the middle
    blocks = {int(name[len(prefix):].split(".")[0]) for name in message.tensors if name.startswith(prefix)}
    assert blocks == set(layout.adapter_emulator_indices)
    assert torch.equal(message.tensors["classifier.weight"], full.state_dict()["classifier.weight"])


def test_adapter_lora_trains_factors_on_the_adapter_and_plugs_in_their_product(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``[offsite] adapter_lora``: rounds carry LoRA factors on the adapter blocks (and the head); the
    coordinator's plug-in puts W + (alpha/r)·B·A into the full model's adapter blocks, nothing else."""
    from client.runtime import ClientRuntime
    from coordinator.offsite_model import OffsiteGlobalModel
    from emulator.lora import MergeError

    rows = read_examples(VALIDATION, need_label=True)[:120]
    write_jsonl(tmp_path / "val.jsonl", rows[:60])
    config = parse_job({
        "job": {"name": "off-lora", "mode": "offsite", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
        "model": {"path": str(tiny_bert_dir), "max_length": 32},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
        "lora": {"r": 4, "alpha": 8},
        "offsite": {"adapter_layers": 1, "keep": 1, "adapter_lora": True},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    layout = EmulatorLayout.load(job.package.folder / "model")
    message = job.engine.train_message(1, 1)
    names = set(message.tensors)
    factors = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    heads = names - factors
    assert heads and all(".classifier.modules_to_save." in n for n in heads)
    top = layout.adapter_emulator_indices[-1]
    factor_blocks = {int(n.split(".layer.")[1].split(".")[0]) for n in factors}
    assert factor_blocks == set(layout.adapter_emulator_indices) == {0, top}
    assert all(".query." in n or ".value." in n for n in factors)  # the registry's targets for BERT
    assert job.package.spec.trainable == {n: list(t.shape) for n, t in message.tensors.items()}

    # a real client trains the factors and the head through the same runtime as lora mode
    runtime = ClientRuntime.from_package(job.package.folder, rows[60:], state_dir=None)
    reply = runtime.handle(decode_message(encode_message(message)))
    assert set(reply.tensors) == names
    trained = {n: message.tensors[n] + reply.tensors[n] for n in names}  # the client sends deltas
    assert any(not torch.equal(trained[n], message.tensors[n]) for n in factors if ".lora_B." in n)

    model = job.model
    assert isinstance(model, OffsiteGlobalModel)
    model.set_trainable_state(trained)
    full = load_model(tiny_bert_dir, "classification", job.package.spec.labels, seed=0).state_dict()
    plugged = model.plugged.state_dict()
    scale = 8 / 4
    for emulator_block, full_block in zip(layout.adapter_emulator_indices, layout.adapter_full_indices, strict=True):
        for target in ("query", "value"):
            stem = f"base_model.model.bert.encoder.layer.{emulator_block}.attention.self.{target}"
            a, b = trained[f"{stem}.lora_A.default.weight"], trained[f"{stem}.lora_B.default.weight"]
            weight = f"bert.encoder.layer.{full_block}.attention.self.{target}.weight"
            torch.testing.assert_close(plugged[weight], full[weight] + scale * b @ a, rtol=0, atol=1e-6)
            assert not torch.equal(plugged[weight], full[weight])
    changed = {n for n in full if not torch.equal(full[n], plugged[n])}
    adapter_blocks = tuple(f"bert.encoder.layer.{i}.attention.self." for i in layout.adapter_full_indices)
    assert changed and all(n.startswith(adapter_blocks) or n.startswith("classifier.") for n in changed)
    head = next(n for n in heads if n.endswith("weight"))
    assert torch.equal(plugged["classifier.weight"], trained[head])

    # a non-finite factor is refused and the last good state stays in force
    bad = dict(trained)
    first_b = next(n for n in sorted(factors) if ".lora_B." in n)
    bad[first_b] = torch.full_like(bad[first_b], float("nan"))
    with pytest.raises((MergeError, ValueError)):
        model.set_trainable_state(bad)
    assert all(torch.equal(model.trainable_state()[n], trained[n]) for n in names)
    assert all(torch.equal(model.plugged.state_dict()[n], plugged[n]) for n in plugged)


def test_a_job_with_distillation_ships_a_changed_middle_and_keeps_its_checkpoint(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``distill_steps`` > 0: the coordinator distils the kept middle on the owner's public text before
    packaging; what ships of the middle is no longer the full model's block, and a resumable
    distillation checkpoint stays beside the package."""
    rows = read_examples(VALIDATION, need_label=True)[:200]
    write_jsonl(tmp_path / "val.jsonl", rows[:50])
    (tmp_path / "public.txt").write_text("\n".join(r.text for r in rows[50:]) + "\n")
    config = parse_job({
        "job": {"name": "off-distil", "mode": "offsite", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
        "model": {"path": str(tiny_bert_dir), "max_length": 24},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "offsite": {"adapter_layers": 1, "keep": 1, "distill_data": "public.txt", "distill_steps": 3,
                    "distill_lr": 1e-3, "distill_batch_size": 8, "distill_input_noise": 0.5,
                    "distill_hidden_metric": "channel"},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    layout = EmulatorLayout.load(job.package.folder / "model")
    (kept,) = layout.kept_middle
    full = load_model(tiny_bert_dir, "classification", job.package.spec.labels, seed=0).state_dict()
    shipped = load_safetensors((job.package.folder / "model" / "model.safetensors").read_bytes())
    prefix = "bert.encoder.layer."
    middle = [n for n in shipped if n.startswith(f"{prefix}1.") and n.endswith("dense.weight")]
    assert middle
    assert all(not torch.equal(shipped[n], full[n.replace(f"{prefix}1.", f"{prefix}{kept}.")]) for n in middle)
    (meta,) = (tmp_path / "out").rglob("distill_state.json")
    saved = json.loads(meta.read_text())["config"]
    assert saved["input_noise"] == 0.5 and saved["max_length"] == 24 and saved["batch_size"] == 8
    assert saved["hidden_metric"] == "channel" and saved["kl_weight"] == 0.0


def _bert_offsite_job_after_one_round(tiny_bert_dir: Path, tmp_path: Path, offsite: dict[str, object]) -> Any:
    """A tiny-BERT offsite job with public text, after one client's round: its OffsiteGlobalModel."""
    from client.runtime import ClientRuntime
    from coordinator.offsite_model import OffsiteGlobalModel

    rows = read_examples(VALIDATION, need_label=True)[:300]
    write_jsonl(tmp_path / "val.jsonl", rows[:60])
    (tmp_path / "public.txt").write_text("\n".join(r.text for r in rows[160:]) + "\n")
    config = parse_job({
        "job": {"name": "off-refine", "mode": "offsite", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
        "model": {"path": str(tiny_bert_dir), "max_length": 24},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "train": {"local_steps": 5, "batch_size": 8, "lr": 1e-2},
        "offsite": {"adapter_layers": 1, "keep": 1, "distill_data": "public.txt", **offsite},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    model = job.model
    assert isinstance(model, OffsiteGlobalModel)
    message = job.engine.train_message(1, 1)
    reply = ClientRuntime.from_package(job.package.folder, rows[60:160], state_dir=None).handle(
        decode_message(encode_message(message)))
    model.set_trainable_state({n: message.tensors[n] + reply.tensors[n] for n in message.tensors})
    return model


def test_export_refines_the_plug_in_on_public_text_and_leaves_the_clients_adapter_alone(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``refine_steps`` > 0: final/ is the plug-in refined against the tuned emulator (only adapter blocks
    and head differ from the plain plug-in), refinement.json records it, and what clients train is unchanged."""
    from transformers import AutoModelForSequenceClassification

    from coordinator.offsite_model import REFINEMENT_FILE
    from emulator.tasks import evaluate

    model = _bert_offsite_job_after_one_round(tiny_bert_dir, tmp_path,
                                              {"refine_steps": 20, "refine_lr": 1e-3, "refine_keep": "always"})
    before = model.trainable_state()
    plain = {n: t.clone() for n, t in model.plugged.state_dict().items()}

    model.export(tmp_path / "final")
    summary = json.loads((tmp_path / "final" / REFINEMENT_FILE).read_text())
    # (that refinement lowers a real mismatch is tests/emulator/test_refine.py's; a random tiny BERT has none)
    assert summary["steps"] == 20 and summary["kl_first"] >= 0 and summary["kl_last"] >= 0 and summary["kept"]
    assert summary["validation_plug_in"] == model.evaluate()
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert model.validation is not None
    assert evaluate(final, model.validation)["val_accuracy"] == pytest.approx(
        summary["validation_refined"]["val_accuracy"], abs=1e-9)
    adapter_blocks = tuple(f"bert.encoder.layer.{i}." for i in model.layout.adapter_full_indices)
    changed = {n for n, t in final.state_dict().items() if not torch.equal(t, plain[n])}
    assert changed and all(n.startswith(adapter_blocks) or n.startswith("classifier.") for n in changed)
    assert all(torch.equal(model.trainable_state()[n], before[n]) for n in before)


def test_export_keeps_the_plain_plug_in_when_refinement_scores_worse_on_validation(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``refine_keep = "better"`` (the default): a refinement that hurts (here a learning rate of 1, which wrecks
    the adapter blocks) is recorded in refinement.json and final/ holds the plain plug-in, tensor for tensor."""
    from transformers import AutoModelForSequenceClassification

    from coordinator.offsite_model import REFINEMENT_FILE

    model = _bert_offsite_job_after_one_round(tiny_bert_dir, tmp_path, {"refine_steps": 10, "refine_lr": 1.0})
    plain = {n: t.clone() for n, t in model.plugged.state_dict().items()}

    model.export(tmp_path / "final")
    summary = json.loads((tmp_path / "final" / REFINEMENT_FILE).read_text())
    assert summary["keep"] == "better" and summary["kept"] is False
    assert summary["validation_refined"]["val_loss"] > summary["validation_plug_in"]["val_loss"]
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(t, plain[n]) for n, t in final.items())


@pytest.mark.parametrize(("before", "after", "helps"), [
    ({"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.6, "val_loss": 1.2}, True),   # accuracy decides
    ({"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.5, "val_loss": 0.9}, True),   # a tie: the loss
    ({"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.5, "val_loss": 1.0}, False),  # no better: plain
    ({"val_perplexity": 70.0, "val_loss": 4.25}, {"val_perplexity": 72.0, "val_loss": 4.28}, False),
    ({"val_perplexity": 70.0, "val_loss": 4.25}, {"val_perplexity": 65.0, "val_loss": 4.17}, True),
    (None, None, True),                                                                      # nothing to judge by
])
def test_refinement_is_judged_by_the_jobs_headline_metric(before: Any, after: Any, helps: bool) -> None:
    from coordinator.offsite_model import refinement_helps

    summary = {} if before is None else {"validation_plug_in": before, "validation_refined": after}
    assert refinement_helps(summary) is helps


def test_export_refines_a_causal_lm_on_texts_its_teacher_writes_without_public_text(tmp_path: Path) -> None:
    """``refine_text = "generated"``: no distill_data needed; the coordinator's teacher (the tuned emulator mixed
    with the plug-in) writes the texts, refinement.json says so, and only the adapter blocks of final/ move."""
    from transformers import AutoModelForCausalLM

    from client.runtime import ClientRuntime
    from coordinator.offsite_model import REFINEMENT_FILE, OffsiteGlobalModel
    from tests.emulator.tiny_gguf import tiny_llama, write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(layers=6))
    rows = read_examples(VALIDATION, need_label=False)[:200]
    write_jsonl(tmp_path / "val.jsonl", rows[:40])
    config = parse_job({
        "job": {"name": "off-refine-gen", "mode": "offsite", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
        "model": {"path": "tiny.gguf", "task": "causal-lm", "max_length": 16},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "train": {"local_steps": 5, "batch_size": 8, "lr": 1e-2},
        "offsite": {"adapter_layers": 1, "keep": 2, "refine_steps": 10, "refine_lr": 1e-3,
                    "refine_text": "generated", "refine_generated_texts": 24, "refine_emulator_weight": 0.5,
                    "refine_keep": "always"},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    model = job.model
    assert isinstance(model, OffsiteGlobalModel)
    message = job.engine.train_message(1, 1)
    reply = ClientRuntime.from_package(job.package.folder, rows[40:], state_dir=None).handle(
        decode_message(encode_message(message)))
    model.set_trainable_state({n: message.tensors[n] + reply.tensors[n] for n in message.tensors})
    plain = {n: t.clone() for n, t in model.plugged.state_dict().items()}

    model.export(tmp_path / "final")
    summary = json.loads((tmp_path / "final" / REFINEMENT_FILE).read_text())
    assert summary["text"] == "generated" and summary["emulator_weight"] == 0.5 and summary["steps"] == 10
    assert summary["kl_first"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    layout = EmulatorLayout.load(job.package.folder / "model")
    adapter_blocks = tuple(f"model.layers.{i}." for i in layout.adapter_full_indices)
    changed = {n for n, t in final.state_dict().items() if not torch.equal(t, plain[n])}
    assert changed and all(n.startswith(adapter_blocks) for n in changed), sorted(changed)
