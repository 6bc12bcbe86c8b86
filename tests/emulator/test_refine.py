"""Plug-in refinement: the plugged-in full model learns the tuned emulator's predictions on public
text, only through the adapter blocks and head, and a perfect emulator leaves nothing to refine."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from emulator.adapter import adapter_parameter_names, head_parameter_names, plug_in
from emulator.batching import collate, encode, pad_id_of
from emulator.exposure import tensor_digest
from emulator.layout import EmulatorLayout
from emulator.offsite import build_emulator
from emulator.refine import (
    MixtureTeacher,
    RefineConfig,
    RefineError,
    _kl,
    cached_step,
    generate_texts,
    refine_plug_in,
    refinement_teacher,
)
from tests.emulator.test_distill import word_texts, word_tokenizer
from tests.tiny_models import tiny_model


def _full(family: str, task: str) -> PreTrainedModel:
    full = tiny_model(family, task, layers=6)
    with torch.no_grad():  # a trained head, not a fresh near-zero one: logits that disagree measurably
        for name, p in full.named_parameters():
            if name in head_parameter_names(full) and p.dim() == 2:
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return full


def _tuned(full: PreTrainedModel, keep: int) -> tuple[PreTrainedModel, EmulatorLayout, dict[str, torch.Tensor]]:
    """An emulator whose adapter blocks and head moved away from the full model's, as client training would,
    and (with blocks dropped) whose kept middle moved too, as distillation does."""
    emulator, layout = build_emulator(full, adapter_layers=1, keep=keep)
    names = set(adapter_parameter_names(emulator, layout, emulator=True)) | set(head_parameter_names(emulator))
    middle = {f"{layout.blocks_prefix}.{i}." for i in layout.middle_emulator_indices} if layout.dropped else set()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in emulator.named_parameters():
            if name in names or any(name.startswith(m) for m in middle):
                p.add_(0.3 * p.std().nan_to_num(0.02).clamp(min=0.02) * torch.randn(p.shape, generator=gen))
    state = {n: t.clone() for n, t in emulator.state_dict().items() if n in names}
    return emulator, layout, state


def _mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, texts: list[str], causal: bool) -> float:
    tok = word_tokenizer()
    data = encode(tok, texts, 16)
    batch = collate(data, list(range(len(data))), pad_id_of(tok))
    with torch.no_grad():
        mask = batch["attention_mask"].float() if causal else None
        return float(_kl(student(**batch).logits, teacher(**batch).logits, mask, 1.0))


@pytest.mark.parametrize(("family", "task"), [("bert", "classification"), ("llama", "causal-lm"),
                                            ("gpt2", "causal-lm")])
def test_refinement_brings_the_plug_in_to_the_tuned_emulator_through_the_adapter_only(family: str,
                                                                                      task: str) -> None:
    full = _full(family, task)
    teacher, layout, state = _tuned(full, keep=2)
    plugged = plug_in(full, state, layout)
    before = {n: tensor_digest(t) for n, t in plugged.state_dict().items()}
    teacher_before = {n: tensor_digest(t) for n, t in teacher.state_dict().items()}
    held = word_texts(48, seed=99)
    kl0 = _mean_kl(plugged, teacher, held, task == "causal-lm")
    refined, losses = refine_plug_in(plugged, teacher, layout, word_tokenizer(), word_texts(256, seed=1),
                                     RefineConfig(steps=60, batch_size=16, lr=1e-3, max_length=16, temperature=1.0),
                                     progress=False)
    kl1 = _mean_kl(refined, teacher, held, task == "causal-lm")
    assert kl0 > 0 and kl1 < 0.5 * kl0, (kl0, kl1)
    assert len(losses) == 60
    trainable = set(adapter_parameter_names(refined, layout, emulator=False)) | set(head_parameter_names(refined))
    changed = {n for n, t in refined.state_dict().items() if tensor_digest(t) != before[n]}
    assert changed and changed <= trainable, sorted(changed - trainable)
    # neither the plug-in it started from nor the teacher moved
    assert {n: tensor_digest(t) for n, t in plugged.state_dict().items()} == before
    assert {n: tensor_digest(t) for n, t in teacher.state_dict().items()} == teacher_before


def test_a_perfect_emulator_leaves_nothing_to_refine() -> None:
    """Every middle block kept: the plug-in already is the teacher; refinement must not drift from it
    (Adam turns rounding-level gradients into lr-sized steps, so 'unchanged' means 'still agrees')."""
    full = _full("bert", "classification")
    teacher, layout, state = _tuned(full, keep=4)
    assert not layout.dropped
    plugged = plug_in(full, state, layout)
    held = word_texts(48, seed=99)
    assert _mean_kl(plugged, teacher, held, False) < 1e-9
    refined, losses = refine_plug_in(plugged, teacher, layout, word_tokenizer(), word_texts(64, seed=1),
                                     RefineConfig(steps=5, batch_size=16, lr=1e-4, max_length=16), progress=False)
    assert losses[0] < 1e-9 and max(losses) < 1e-4
    assert _mean_kl(refined, teacher, held, False) < 1e-4


def _mixture_setup(weight: float) -> tuple[PreTrainedModel, PreTrainedModel, EmulatorLayout, torch.nn.Module]:
    full = _full("llama", "causal-lm")
    emulator, layout, state = _tuned(full, keep=2)
    plugged = plug_in(full, state, layout)
    return plugged, emulator, layout, refinement_teacher(plugged, emulator, RefineConfig(emulator_weight=weight))


def test_the_mixture_teacher_is_the_normalised_geometric_mixture_and_weight_1_is_the_emulator() -> None:
    plugged, emulator, _, teacher = _mixture_setup(0.3)
    tok = word_tokenizer()
    batch = collate(encode(tok, word_texts(6, seed=3), 16), list(range(6)), pad_id_of(tok))
    with torch.no_grad():
        p_plug = torch.softmax(plugged(**batch).logits.double(), -1)
        p_emu = torch.softmax(emulator(**batch).logits.double(), -1)
        mixed = teacher(**batch).logits
    expected = p_plug**0.7 * p_emu**0.3
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(mixed.exp().double(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed.exp().double(), p_emu, atol=1e-3)  # the plug-in does count
    assert refinement_teacher(plugged, emulator, RefineConfig(emulator_weight=1.0)) is emulator
    with pytest.raises(ValueError, match="emulator_weight"):
        MixtureTeacher(plugged, emulator, 0.0)


def test_the_mixture_teacher_predicts_the_same_with_and_without_its_kv_cache() -> None:
    """Generation feeds one token at a time through both models' caches: that must be the full recompute."""
    _, _, _, teacher = _mixture_setup(0.4)
    ids = torch.tensor([[2, 5, 9, 14, 7, 30, 11]])
    with torch.no_grad():
        whole = teacher(input_ids=ids).logits
        cache, steps = None, []
        for i in range(ids.shape[1]):
            logits, cache = cached_step(teacher, ids[:, i:i + 1], cache)
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), whole, atol=1e-4, rtol=1e-4)


def test_generated_texts_are_seeded_samples_of_the_teacher_and_refinement_learns_from_them() -> None:
    plugged, _, layout, teacher = _mixture_setup(0.25)
    tok = word_tokenizer()
    config = RefineConfig(steps=60, batch_size=16, lr=1e-3, max_length=12, temperature=1.0, emulator_weight=0.25,
                          text="generated", generated_texts=40, seed=5)
    texts = generate_texts(teacher, tok, config, batch_size=16, progress=False)
    assert len(texts) == 40 and all(texts)
    assert texts == generate_texts(teacher, tok, config, batch_size=16, progress=False)
    assert texts != generate_texts(teacher, tok, RefineConfig(**{**vars(config), "seed": 6}), progress=False)
    # what the teacher wrote is what the student reads back: max_length - 1 sampled tokens, less the special
    # ones a random tiny model also samples
    lengths = [len(ids) for ids in encode(tok, texts, 64).input_ids]
    assert max(lengths) == config.max_length - 1 and min(lengths) >= config.max_length - 5, lengths
    held = generate_texts(teacher, tok, RefineConfig(**{**vars(config), "seed": 99}), progress=False)
    kl0 = _mean_kl(plugged, teacher, held, True)
    refined, _ = refine_plug_in(plugged, teacher, layout, tok, texts, config, progress=False)
    kl1 = _mean_kl(refined, teacher, held, True)
    assert kl0 > 0 and kl1 < 0.7 * kl0, (kl0, kl1)


def test_generated_text_needs_a_language_model() -> None:
    full = _full("bert", "classification")
    emulator, _, _ = _tuned(full, keep=2)
    with pytest.raises(RefineError, match="causal language model"):
        generate_texts(emulator, word_tokenizer(), RefineConfig(text="generated", generated_texts=2), progress=False)
