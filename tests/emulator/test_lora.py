"""LoRA through peft on every supported family: merge is exact, FFA-LoRA averages exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from emulator.architectures import (
    UnsupportedArchitectureError,
    spec_for,
    spec_for_config,
    supported_model_types,
)
from emulator.lora import (
    MergeError,
    add_lora,
    load_trainable_state,
    merged_copy,
    trainable_state,
)
from emulator.settings import LoraSettings
from tests.tiny_models import FAMILIES, tiny_batch, tiny_model

# fp32 merge of a rank-8 update into 32x32 weights: differences are rounding only
MERGE_ATOL = 1e-5


def _perturb_lora(model: torch.nn.Module, seed: int) -> None:
    """Fresh LoRA has B = 0 (a no-op); give every trainable tensor real values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or ".lora_A." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_merged_model_matches_adapter_model(family: str, task: str) -> None:
    model = add_lora(tiny_model(family, task), LoraSettings(r=4, alpha=8), task=task)
    _perturb_lora(model, seed=1)
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        merged = merged_copy(model)
        got = merged(**batch).logits
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(got, expected, atol=MERGE_ATOL, rtol=0)
    # and merging did not change the adapter model it was copied from
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_model_loads_with_plain_transformers(family: str, tmp_path: Path) -> None:
    model = add_lora(tiny_model(family, "classification"), LoraSettings(r=4), task="classification")
    _perturb_lora(model, seed=2)
    merged = merged_copy(model)
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=MERGE_ATOL, rtol=0)
    assert (tmp_path / "model.safetensors").exists()


def test_merge_refuses_non_finite_weights() -> None:
    model = add_lora(tiny_model("llama", "causal-lm"), LoraSettings(r=4), task="causal-lm")
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    with pytest.raises(MergeError, match="non-finite"):
        merged_copy(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffa_lora_trains_only_b_and_head(family: str) -> None:
    model = add_lora(tiny_model(family, "classification"), LoraSettings(r=4, freeze_a=True), task="classification")
    names = list(trainable_state(model))
    assert names and not any(".lora_A." in n for n in names)
    assert any(".lora_B." in n for n in names)
    assert any("modules_to_save" in n for n in names)


def test_ffa_lora_averaging_b_equals_averaging_products() -> None:
    """With A shared and frozen, mean_i(B_i) A == mean_i(B_i A): FedAvg of B is exact."""
    base = add_lora(tiny_model("llama", "causal-lm"), LoraSettings(r=4, freeze_a=True), task="causal-lm")
    _perturb_lora(base, seed=3)
    clients = []
    for seed in range(3):
        client = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for name, param in client.named_parameters():
                if ".lora_B." in name:
                    param.add_(torch.randn(param.shape, generator=gen))
        clients.append(client)
    states = [trainable_state(c) for c in clients]
    averaged = copy.deepcopy(base)
    mean_b: dict[str, torch.Tensor] = {}
    for k in states[0]:
        total = sum(s[k] for s in states)
        assert isinstance(total, torch.Tensor)
        mean_b[k] = total / 3
    load_trainable_state(averaged, mean_b)
    params = [dict(c.named_parameters()) for c in [*clients, averaged]]
    checked = 0
    for name, a in base.named_parameters():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        products = [p[b_name] @ a for p in params[:3]]
        torch.testing.assert_close(params[3][b_name] @ a, sum(products) / 3, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked > 0


def test_plain_lora_averaging_is_not_exact() -> None:
    """The reason FFA-LoRA exists: averaging A and B separately is not averaging BA."""
    torch.manual_seed(0)
    a = [torch.randn(4, 8) for _ in range(2)]
    b = [torch.randn(8, 4) for _ in range(2)]
    sum_a, sum_b = sum(a), sum(b)
    products = sum(bi @ ai for ai, bi in zip(a, b, strict=True)) / 2
    assert isinstance(sum_a, torch.Tensor) and isinstance(sum_b, torch.Tensor)
    assert isinstance(products, torch.Tensor)
    separate = (sum_b / 2) @ (sum_a / 2)
    assert not torch.allclose(separate, products, atol=1e-3)


def test_trainable_state_round_trip_checks_names_and_shapes() -> None:
    model = add_lora(tiny_model("bert"), LoraSettings(r=4), task="classification")
    state = trainable_state(model)
    load_trainable_state(model, state)
    with pytest.raises(KeyError):
        load_trainable_state(model, {k: v for i, (k, v) in enumerate(state.items()) if i})
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, name: torch.zeros(1)})


def test_registry_knows_every_family_and_names_the_supported_ones() -> None:
    for family in FAMILIES:
        assert spec_for(tiny_model(family)).family == family
    from transformers import T5Config

    with pytest.raises(UnsupportedArchitectureError, match=r"supported: .*bert.*llama"):
        spec_for_config(T5Config())
    assert "qwen2" in supported_model_types()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_exist_in_each_family(family: str) -> None:
    model = AutoModelForCausalLM.from_config(tiny_model(family, "causal-lm").config)
    targets = spec_for(model).lora_targets
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(targets) <= leaf_names


@pytest.mark.parametrize("family", FAMILIES)
def test_head_learning_rate_group_finds_the_head_in_lora_and_plain_models(family: str) -> None:
    from client.trainer import TrainSettings, param_groups

    plain = tiny_model(family)
    for p in plain.parameters():
        p.requires_grad_(False)
    for name, p in plain.named_parameters():
        if name.startswith(spec_for(plain).classifier_head + "."):
            p.requires_grad_(True)
    lora = add_lora(tiny_model(family), LoraSettings(r=4), task="classification")
    for model in (plain, lora):
        groups = param_groups(model, TrainSettings(local_steps=1, batch_size=1, lr=1e-4, head_lr=1e-2))
        head = [g for g in groups if g["lr"] == 1e-2]
        assert len(head) == 1 and sum(p.numel() for p in head[0]["params"]) == 3 * 32 + 3 * (family == "bert")
