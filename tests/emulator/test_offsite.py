"""Offsite emulator: build by layer drop, save/reload, KV cache, plug-in, exposure by hash."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from emulator.adapter import (
    adapter_lora_config,
    adapter_parameter_names,
    block_index,
    emulator_to_full_state,
    head_parameter_names,
    plug_in,
)
from emulator.architectures import blocks_prefix, num_blocks, transformer_blocks
from emulator.exposure import exposure, tensor_digest
from emulator.layout import (
    LAYOUT_FILENAME,
    EmulatorError,
    EmulatorLayout,
    load_layout_checked,
    plan_layout,
    uniform_keep,
)
from emulator.offsite import build_emulator, save_emulator
from tests.tiny_models import FAMILIES, tiny_batch, tiny_model

CASES = [(f, t) for f, t in itertools.product(FAMILIES, ("classification", "causal-lm"))
         if not (f == "bert" and t == "causal-lm")]
AUTO = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}


def scrambled(family: str, task: str, layers: int = 6, seed: int = 0) -> PreTrainedModel:
    """A tiny model whose every tensor is distinct (norm weights are no longer all ones)."""
    model = tiny_model(family, task, seed=seed, layers=layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def state_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: tensor_digest(t) for n, t in model.state_dict().items()}


# ---------------------------------------------------------------------------
# Choosing blocks


@pytest.mark.parametrize(("n", "k"), [(4, 2), (5, 3), (20, 5), (7, 7), (10, 4), (2, 2)])
def test_uniform_keep_matches_formula(n: int, k: int) -> None:
    got = uniform_keep(n, k)
    assert got == [round(i * (n - 1) / (k - 1)) for i in range(k)]
    assert got[0] == 0 and got[-1] == n - 1 and len(set(got)) == k


def test_uniform_keep_small_cases() -> None:
    assert uniform_keep(4, 0) == []
    assert uniform_keep(5, 1) == [2]
    with pytest.raises(EmulatorError):
        uniform_keep(3, 4)


def test_plan_layout_defaults_and_ratio() -> None:
    six = plan_layout(6)
    assert (six.adapter_bottom, six.adapter_top, six.kept_middle) == ([0], [5], [1, 4])
    deep = plan_layout(24)  # 2+2 adapter, 20 middle, half kept
    assert deep.adapter_bottom == [0, 1] and deep.adapter_top == [22, 23]
    assert len(deep.kept_middle) == 10 and deep.kept_middle[0] == 2 and deep.kept_middle[-1] == 21
    assert plan_layout(24, keep_ratio=0.25).kept_middle == [2 + round(i * 19 / 4) for i in range(5)]
    assert plan_layout(24, adapter_layers=3, keep=2).kept_middle == [3, 20]


@pytest.mark.parametrize(
    "kwargs",
    [{"adapter_layers": 3}, {"adapter_layers": 0}, {"keep": 5}, {"keep": 1, "keep_ratio": 0.5},
     {"keep_ratio": 0.0}, {"keep_ratio": 1.5}],
)
def test_plan_layout_rejects(kwargs: dict[str, float]) -> None:
    with pytest.raises(EmulatorError):
        plan_layout(6, **kwargs)  # type: ignore[arg-type]


def test_layout_json_round_trip_and_mapping() -> None:
    layout = plan_layout(12, adapter_layers=2, keep=3)
    again = EmulatorLayout.from_json(layout.to_json())
    assert again == layout
    assert [again.emulator_to_full_index(i) for i in range(again.num_emulator_blocks)] == \
        [0, 1, 2, 6, 9, 10, 11]
    assert again.dropped == [3, 4, 5, 7, 8]
    with pytest.raises(EmulatorError):
        again.emulator_to_full_index(7)
    with pytest.raises(EmulatorError):
        EmulatorLayout.from_json('{"num_full_blocks": 3}')
    with pytest.raises(EmulatorError):
        EmulatorLayout.from_json("not json")


# ---------------------------------------------------------------------------
# Build, save, reload


@pytest.mark.parametrize(("family", "task"), CASES)
def test_build_save_reload_forward(family: str, task: str, tmp_path: Path) -> None:
    full = tiny_model(family, task, layers=6)
    before = state_hashes(full)
    emulator, layout = build_emulator(full, adapter_layers=1, keep=2)
    assert state_hashes(full) == before, "the input model must stay untouched"
    assert num_blocks(emulator.config) == 4 == len(transformer_blocks(emulator))
    assert num_blocks(full.config) == 6 == len(transformer_blocks(full))
    assert layout.emulator_blocks == [0, 1, 4, 5]
    assert layout.blocks_prefix == blocks_prefix(full)

    save_emulator(emulator, layout, tmp_path)
    assert (tmp_path / LAYOUT_FILENAME).is_file()
    reloaded = AUTO[task].from_pretrained(tmp_path)
    reloaded.eval()
    assert num_blocks(reloaded.config) == 4 == len(transformer_blocks(reloaded))
    assert load_layout_checked(tmp_path, reloaded) == layout
    batch = tiny_batch()
    with torch.no_grad():
        out = reloaded(**batch).logits
        assert torch.equal(out, emulator(**batch).logits)
    assert torch.isfinite(out).all()

    # the emulator's block i *is* full block layout.emulator_blocks[i]
    full_state = full.state_dict()
    prefix = layout.blocks_prefix
    for name, tensor in reloaded.state_dict().items():
        if name.startswith(prefix + "."):
            i = int(name[len(prefix) + 1:].split(".")[0])
            source = f"{prefix}.{layout.emulator_to_full_index(i)}." + \
                name[len(prefix) + 1:].split(".", 1)[1]
            assert torch.equal(tensor, full_state[source]), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_generation_with_kv_cache(family: str, tmp_path: Path) -> None:
    full = tiny_model(family, "causal-lm", layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    assert layout.emulator_blocks == [0, 1, 2, 5, 6, 7]
    for position, block in enumerate(transformer_blocks(emulator)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == position
    save_emulator(emulator, layout, tmp_path)
    model: Any
    for model in (emulator, AutoModelForCausalLM.from_pretrained(tmp_path).eval()):
        prompt = tiny_batch(batch=2, length=5)["input_ids"]
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                pad_token_id=0)
        plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False,
                               pad_token_id=0)
        assert cached.shape == (2, 13)
        assert torch.equal(cached, plain)


def test_stale_layer_idx_breaks_the_cache() -> None:
    """The pitfall the renumbering exists for: stale indices fail under generation."""
    full = tiny_model("llama", "causal-lm", layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    block: Any
    for i, block in zip(layout.emulator_blocks, transformer_blocks(emulator), strict=True):
        block.self_attn.layer_idx = i
    prompt = tiny_batch(batch=1, length=4)["input_ids"]
    gen: Any = emulator
    with pytest.raises(IndexError):
        gen.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True,
                          pad_token_id=0)


# ---------------------------------------------------------------------------
# Names and plug-in


@pytest.mark.parametrize(("family", "task"), CASES)
def test_plug_in_untouched_adapter_is_exact(family: str, task: str) -> None:
    full = scrambled(family, task)
    emulator, layout = build_emulator(full)
    names = adapter_parameter_names(emulator, layout, emulator=True)
    state = emulator.state_dict()
    adapter = {n: state[n].clone() for n in [*names, *head_parameter_names(emulator)]}
    merged = plug_in(full, adapter, layout)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, full(**batch).logits)
    assert state_hashes(merged) == state_hashes(full)


@pytest.mark.parametrize(("family", "task"), [("bert", "classification"), ("llama", "causal-lm"),
                                              ("gpt2", "classification"), ("opt", "causal-lm")])
def test_plug_in_replaces_exactly_the_adapter(family: str, task: str) -> None:
    full = scrambled(family, task, layers=8)
    original = state_hashes(full)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=1)
    emu_names = adapter_parameter_names(emulator, layout, emulator=True)
    full_names = adapter_parameter_names(full, layout, emulator=False)
    assert len(emu_names) == len(full_names) > 0
    heads = head_parameter_names(emulator)
    trained = {n: emulator.state_dict()[n] + 1.0 for n in [*emu_names, *heads]}
    merged = plug_in(full, trained, layout)
    assert state_hashes(full) == original, "plug_in must work on a copy"
    renamed = emulator_to_full_state(trained, layout)
    assert set(renamed) == {*full_names, *heads}
    merged_state = merged.state_dict()
    for name, digest in state_hashes(merged).items():
        if name in renamed:
            assert torch.equal(merged_state[name], renamed[name]), name
        elif not any(merged_state[name].data_ptr() == merged_state[r].data_ptr() for r in renamed):
            assert digest == original[name], f"{name} changed but is not in the adapter"
    # adapter blocks of the full model are 0,1,6,7 and come from emulator blocks 0,1,3,4
    prefix = layout.blocks_prefix
    assert {int(n[len(prefix) + 1:].split(".")[0]) for n in full_names} == {0, 1, 6, 7}
    assert {int(n[len(prefix) + 1:].split(".")[0]) for n in emu_names} == {0, 1, 3, 4}


def test_plug_in_refuses_bad_states() -> None:
    full = tiny_model("llama", "classification", layers=6)
    emulator, layout = build_emulator(full)
    names = adapter_parameter_names(emulator, layout, emulator=True)
    state = emulator.state_dict()
    bad = {n: state[n].clone() for n in names}
    bad[names[0]][..., 0] = float("nan")
    with pytest.raises(EmulatorError, match="non-finite"):
        plug_in(full, bad, layout)
    middle = f"{layout.blocks_prefix}.1.{names[0].split('.', 3)[-1]}"
    with pytest.raises(EmulatorError, match="middle block"):
        plug_in(full, {middle: state[middle]}, layout)
    with pytest.raises(EmulatorError, match="shape"):
        plug_in(full, {names[0]: torch.zeros(3)}, layout)
    with pytest.raises(EmulatorError, match="no such tensor"):
        plug_in(full, {"nothing.weight": torch.zeros(3)}, layout)
    with pytest.raises(EmulatorError):
        adapter_parameter_names(full, layout, emulator=True)


def test_emulator_to_full_state_handles_peft_style_names() -> None:
    layout = plan_layout(8, adapter_layers=2, keep=2)
    layout.blocks_prefix = "model.layers"
    t = torch.zeros(1)
    out = emulator_to_full_state(
        {"base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight": t,
         "model.layers.1.mlp.up_proj.weight": t, "score.weight": t}, layout)
    assert set(out) == {"base_model.model.model.layers.6.self_attn.q_proj.lora_A.weight",
                        "model.layers.1.mlp.up_proj.weight", "score.weight"}


# ---------------------------------------------------------------------------
# What the client downloads


@pytest.mark.parametrize(("family", "task"), CASES)
def test_emulator_files_hold_no_dropped_block(family: str, task: str, tmp_path: Path) -> None:
    full = scrambled(family, task, layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    assert layout.dropped == [3, 4]
    save_emulator(emulator, layout, tmp_path)
    shipped = {tensor_digest(t) for t in load_file(str(tmp_path / "model.safetensors")).values()}
    prefix = layout.blocks_prefix + "."
    dropped = {n: tensor_digest(t) for n, t in full.state_dict().items()
               if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) in layout.dropped}
    kept = {n: tensor_digest(t) for n, t in full.state_dict().items()
            if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) in layout.kept_middle}
    assert dropped and kept
    assert not set(dropped.values()) & shipped, "a dropped block's tensor was shipped"
    assert set(kept.values()) <= shipped  # positive control: the check can see tensors


def test_exposure_counts_verbatim_parameters() -> None:
    full = scrambled("llama", "classification", layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    total = sum(p.numel() for p in full.parameters())
    block_size = sum(p.numel() for p in transformer_blocks(full)[0].parameters())
    report = exposure(full, emulator)
    assert report.full_parameters == total
    assert report.verbatim_parameters == report.emulator_parameters == total - 2 * block_size
    with torch.no_grad():
        for p in transformer_blocks(emulator)[layout.middle_emulator_indices[0]].parameters():
            p.add_(1e-3)
    changed = exposure(full, emulator)
    assert changed.emulator_parameters == report.emulator_parameters
    assert changed.verbatim_parameters == report.verbatim_parameters - block_size
    assert changed.verbatim_fraction < changed.size_fraction


def test_build_keeps_layer_types_aligned() -> None:
    full = tiny_model("llama", "causal-lm", layers=8)
    full.config.layer_types = ["full_attention"] * 8
    emulator, layout = build_emulator(copy.deepcopy(full), adapter_layers=2, keep=2)
    assert len(emulator.config.layer_types) == layout.num_emulator_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_lora_config_touches_only_adapter_blocks(family: str) -> None:
    from peft import get_peft_model

    emulator, layout = build_emulator(tiny_model(family, "classification", layers=8),
                                      adapter_layers=2, keep=2)
    wrapped = get_peft_model(emulator, adapter_lora_config(emulator, layout, r=2))
    prefix = layout.blocks_prefix
    touched = {block_index(n, prefix) for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert touched == set(layout.adapter_emulator_indices) == {0, 1, 4, 5}


def test_tuned_adapter_plugs_in_as_trained() -> None:
    """tune_adapter (LoRA merged) -> plug_in: the full model's adapter blocks are the tuned ones."""
    from emulator.batching import Encoded
    from emulator.evaluation import TrainConfig, tune_adapter

    full = tiny_model("opt", "classification", layers=6)
    emulator, layout = build_emulator(full)
    gen = torch.Generator().manual_seed(3)
    data = Encoded(input_ids=torch.randint(3, 100, (16, 6), generator=gen).tolist(),
                   labels=torch.randint(0, 3, (16,), generator=gen).tolist())
    tuned, state = tune_adapter(emulator, layout, data, TrainConfig(batch_size=8, lr=1e-2),
                                pad_id=1, causal_lm=False, lora_r=2, progress=False)
    assert set(state) == {*adapter_parameter_names(emulator, layout, emulator=True),
                          *head_parameter_names(emulator)}
    merged = plug_in(full, state, layout)
    merged_state, tuned_state = merged.state_dict(), tuned.state_dict()
    changed = [n for n, t in emulator_to_full_state(state, layout).items()
               if not torch.equal(t, full.state_dict()[n])]
    assert changed, "training changed nothing"
    for emu_name, full_name in zip(state, emulator_to_full_state(state, layout), strict=True):
        assert torch.equal(merged_state[full_name], tuned_state[emu_name])


def test_adapter_lora_all_linear_stays_in_the_adapter() -> None:
    from peft import get_peft_model

    emulator, layout = build_emulator(tiny_model("bert", "classification", layers=6))
    cfg = adapter_lora_config(emulator, layout, r=2, target_modules="all-linear")
    wrapped = get_peft_model(emulator, cfg)
    wrapped_names = [n for n, _ in wrapped.named_parameters() if "lora_A" in n]
    assert {block_index(n, layout.blocks_prefix) for n in wrapped_names} == {0, 3}
    assert any(".intermediate.dense." in n for n in wrapped_names)
    assert not any("pooler" in n or "classifier" in n for n in wrapped_names)
