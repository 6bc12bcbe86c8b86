"""Distillation of the emulator's middle: it helps on held-aside text, trains only the
middle, checkpoints as safetensors and resumes to the same result."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from emulator.batching import encode, pad_id_of
from emulator.distill import (
    META_FILE,
    STATE_FILE,
    DistillConfig,
    DistillError,
    channel_distance,
    distill,
    hidden_distance,
    middle_parameters,
    next_token_kl,
    normalized_distance,
    read_text_corpus,
    targets,
)
from emulator.exposure import tensor_digest
from emulator.layout import EmulatorLayout, plan_layout
from emulator.offsite import build_emulator
from tests.tiny_models import VOCAB, tiny_model


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: "w5 w17" -> [5, 17]."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def word_texts(n: int, seed: int) -> list[str]:
    """Sentences of 4-14 words from a sticky random walk over the vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.randrange(3, VOCAB)
        words = []
        for _ in range(rng.randrange(4, 15)):
            w = (w + rng.choice((1, 2, 3, 7, 11, -5))) % (VOCAB - 3) + 3
            words.append(f"w{w}")
        out.append(" ".join(words))
    return out


def _build(family: str = "llama", task: str = "causal-lm") -> tuple[
        PreTrainedModel, PreTrainedModel, EmulatorLayout]:
    full = tiny_model(family, task, layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    return full, emulator, layout


def test_normalized_distance_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    h_full = torch.randn(2, 3, 4, generator=gen)
    h_emu = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = []
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        rms = float(h_full[b, t].pow(2).mean().sqrt())
        expected.append(float(((h_full[b, t] - h_emu[b, t]) / rms).pow(2).mean()))
    got = float(normalized_distance(h_full, h_emu, mask))
    assert got == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert float(normalized_distance(h_full, h_full, mask)) == 0.0


def test_channel_distance_matches_definition_and_sees_past_a_massive_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    h_full = torch.randn(2, 3, 4, generator=gen)
    h_emu = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    real = h_full[mask.bool()]  # [3, 4]
    rms_c = real.pow(2).mean(0).sqrt()
    expected = ((real - h_emu[mask.bool()]) / rms_c).pow(2).mean()
    assert float(channel_distance(h_full, h_emu, mask)) == pytest.approx(float(expected), rel=1e-6)
    # a Llama-like residual: channel 0 is 1000x the others; the student gets channel 0 right and the rest wrong
    massive = torch.randn(2, 3, 8, generator=gen)
    massive[..., 0] = 1000.0
    student = massive.clone()
    student[..., 1:] = torch.randn(2, 3, 7, generator=gen)  # every ordinary channel wrong
    ones = torch.ones(2, 3, dtype=torch.long)
    assert float(normalized_distance(massive, student, ones)) < 1e-4  # the per-token scale hides it
    assert float(channel_distance(massive, student, ones)) > 1.0  # the per-channel scale does not


def test_next_token_kl_matches_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    m = mask.bool()
    expected = torch.nn.functional.kl_div(torch.log_softmax(student[m], -1), torch.log_softmax(teacher[m], -1),
                                          log_target=True, reduction="batchmean")
    assert float(next_token_kl(teacher, student, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert float(next_token_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)


def test_kl_weight_trains_the_middle_toward_the_full_models_predictions() -> None:
    """With the hidden loss switched off, only the KL term can move the middle: held-out KL must fall."""
    full, emulator, layout = _build()
    tok = word_tokenizer()
    held = tok(word_texts(32, seed=98), return_tensors="pt", padding=True)

    def held_kl() -> float:
        with torch.no_grad():
            return float(next_token_kl(full(**held).logits, emulator(**held).logits, held["attention_mask"]))

    before = held_kl()
    distill(full, emulator, layout, tok, word_texts(256, seed=1),
            DistillConfig(steps=30, batch_size=16, lr=3e-3, max_length=32, hidden_weight=0.0, kl_weight=1.0),
            progress=False)
    after = held_kl()
    assert after < 0.8 * before, (before, after)
    cls_full, cls_emu, cls_layout = _build("bert", "classification")
    with pytest.raises(DistillError, match="causal-LM"):
        distill(cls_full, cls_emu, cls_layout, tok, word_texts(8, seed=1),
                DistillConfig(steps=1, kl_weight=1.0), progress=False)


def test_channel_metric_distils_too() -> None:
    full, emulator, layout = _build()
    tok = word_tokenizer()
    held = encode(tok, word_texts(64, seed=99), 32)
    d0 = hidden_distance(full, emulator, layout, held, pad_id=pad_id_of(tok))
    distill(full, emulator, layout, tok, word_texts(256, seed=1),
            DistillConfig(steps=40, batch_size=16, lr=3e-3, max_length=32, hidden_metric="channel"),
            progress=False)
    assert hidden_distance(full, emulator, layout, held, pad_id=pad_id_of(tok)) < 0.7 * d0
    with pytest.raises(DistillError, match="hidden_metric"):
        DistillConfig(hidden_metric="cosine")


def test_targets_pair_the_right_blocks() -> None:
    layout = plan_layout(12, adapter_layers=2, keep=3)  # kept 2, 6, 9; top adapter 10, 11
    assert layout.kept_middle == [2, 6, 9]
    assert targets(layout, "middle") == [(4, 9)]
    assert targets(layout, "segments") == [(2, 5), (3, 8), (4, 9)]
    with pytest.raises(DistillError):
        targets(plan_layout(6, keep=0), "middle")


@pytest.mark.parametrize(("family", "task", "objective"),
                         [("llama", "causal-lm", "middle"), ("bert", "classification", "segments"),
                          ("gpt2", "causal-lm", "middle")])
def test_distillation_lowers_heldout_distance(family: str, task: str, objective: str) -> None:
    full, emulator, layout = _build(family, task)
    tok = word_tokenizer()
    held = encode(tok, word_texts(64, seed=99), 32)
    before_full = {n: tensor_digest(t) for n, t in full.state_dict().items()}
    before_emu = {n: tensor_digest(t) for n, t in emulator.state_dict().items()}
    d0 = hidden_distance(full, emulator, layout, held, pad_id=pad_id_of(tok))
    result = distill(full, emulator, layout, tok, word_texts(256, seed=1),
                     DistillConfig(steps=40, batch_size=16, lr=3e-3, max_length=32,
                                   objective=objective), progress=False)
    d1 = hidden_distance(full, emulator, layout, held, pad_id=pad_id_of(tok))
    assert d0 > 0
    assert d1 < 0.7 * d0, (d0, d1)
    assert len(result.losses) == 40 and layout.distilled
    assert {n: tensor_digest(t) for n, t in full.state_dict().items()} == before_full
    middle = set(middle_parameters(emulator, layout))
    for name, digest in ((n, tensor_digest(t)) for n, t in emulator.state_dict().items()):
        if name in middle:
            assert digest != before_emu[name], f"{name} was not trained"
        else:
            assert digest == before_emu[name], f"{name} is outside the middle but changed"


@pytest.mark.parametrize(("family", "task"), [("llama", "causal-lm"), ("bert", "classification"),
                                            ("gpt2", "causal-lm"), ("opt", "causal-lm")])
def test_input_noise_reaches_teacher_and_student_alike(family: str, task: str) -> None:
    tok = word_tokenizer()
    texts = word_texts(32, seed=1)
    config = DistillConfig(steps=2, batch_size=8, lr=1e-12, max_length=16, input_noise=0.5)
    # every middle block kept: the emulator is the full model, so only unequal noise could make a loss
    full = tiny_model(family, task, layers=6)
    same, same_layout = build_emulator(full, adapter_layers=2, keep=2)
    assert not same_layout.dropped
    assert max(distill(full, same, same_layout, tok, texts, config, progress=False).losses) < 1e-10
    # with blocks dropped the perturbed middle input changes what is matched
    full = tiny_model(family, task, layers=8)
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    noisy = distill(full, emulator, layout, tok, texts, config, progress=False).losses[0]
    emulator, layout = build_emulator(full, adapter_layers=2, keep=2)
    clean = distill(full, emulator, layout, tok, texts, DistillConfig(steps=2, batch_size=8, lr=1e-12,
                    max_length=16), progress=False).losses[0]
    assert noisy > 0 and clean > 0 and abs(noisy - clean) > 1e-4 * clean, (noisy, clean)


def test_lm_weight_adds_the_language_model_loss() -> None:
    full, emulator, layout = _build()
    tok = word_tokenizer()
    res = distill(full, emulator, layout, tok, word_texts(64, seed=1),
                  DistillConfig(steps=3, batch_size=8, lr=1e-3, max_length=16, lm_weight=0.5),
                  progress=False)
    assert len(res.losses) == 3
    cls_full, cls_emu, cls_layout = _build("bert", "classification")
    with pytest.raises(DistillError, match="causal-LM"):
        distill(cls_full, cls_emu, cls_layout, tok, word_texts(8, seed=1),
                DistillConfig(steps=1, lm_weight=1.0), progress=False)


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    tok = word_tokenizer()
    texts = word_texts(128, seed=2)
    config = DistillConfig(steps=8, batch_size=8, lr=2e-3, max_length=16, checkpoint_every=3)

    full, straight, layout = _build()
    distill(full, straight, layout, tok, texts, config, progress=False)

    _, resumed, layout2 = _build()
    ckpt = tmp_path / "ckpt"

    def stop_at_5(step: int, _loss: float) -> None:
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(full, resumed, layout2, tok, texts, config, checkpoint_dir=ckpt,
                on_step=stop_at_5, progress=False)
    assert json.loads((ckpt / META_FILE).read_text())["step"] == 3
    saved = load_file(str(ckpt / STATE_FILE))  # safetensors, not pickle
    assert any(k.startswith("opt.") and k.endswith(".exp_avg_sq") for k in saved)

    _, fresh, layout3 = _build()  # a new process: the emulator starts from layer drop again
    result = distill(full, fresh, layout3, tok, texts, config, checkpoint_dir=ckpt,
                     progress=False)
    assert result.resumed_from == 3 and len(result.losses) == 8
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not list(ckpt.glob("*.tmp"))


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    full, emulator, layout = _build()
    tok = word_tokenizer()
    texts = word_texts(32, seed=3)
    distill(full, emulator, layout, tok, texts,
            DistillConfig(steps=2, batch_size=4, max_length=16), checkpoint_dir=tmp_path,
            progress=False)
    with pytest.raises(DistillError, match="batch_size"):
        distill(full, emulator, layout, tok, texts,
                DistillConfig(steps=4, batch_size=8, max_length=16), checkpoint_dir=tmp_path,
                progress=False)
    with pytest.raises(DistillError, match="hidden_metric"):
        distill(full, emulator, layout, tok, texts,
                DistillConfig(steps=4, batch_size=4, max_length=16, hidden_metric="channel"),
                checkpoint_dir=tmp_path, progress=False)


def test_progress_goes_to_the_log_off_a_terminal_and_to_the_report_every_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A coordinator's stderr is a log file: a line per tenth of the run, no carriage-return bar;
    the report hook (what waiting clients are told) hears every step, counting from a resume."""
    full, emulator, layout = _build()
    tok = word_tokenizer()
    texts = word_texts(64, seed=4)
    config = DistillConfig(steps=20, batch_size=4, max_length=16, checkpoint_every=5)
    caplog.set_level(logging.INFO, logger="fedsite.distill")
    heard: list[str] = []

    def stop_at_12(step: int, _loss: float) -> None:
        if step == 12:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(full, emulator, layout, tok, texts, config, checkpoint_dir=tmp_path, on_step=stop_at_12)
    steps_logged = [r.getMessage() for r in caplog.records if r.name == "fedsite.distill"]
    assert [m.split(",")[0] for m in steps_logged] == [f"distilling the emulator: step {n}/20" for n in (2, 4, 6,
                                                                                                         8, 10, 12)]
    assert all("\r" not in m and "hidden_loss" in m for m in steps_logged)
    distill(full, emulator, layout, tok, texts, config, checkpoint_dir=tmp_path, report=heard.append)
    assert [h.split(",")[0] for h in heard] == [f"distilling the emulator: step {n}/20" for n in range(11, 21)]


def test_read_text_corpus(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "c", "label": 1}\n')
    assert read_text_corpus(jsonl) == ["a b", "c"]
    plain = tmp_path / "t.txt"
    plain.write_text("first line\nsecond line\n")
    assert read_text_corpus(plain, limit=1) == ["first line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "a"}\n')
    with pytest.raises(DistillError, match="text"):
        read_text_corpus(bad)
    with pytest.raises(ValueError, match="no such file"):
        read_text_corpus(tmp_path / "missing.txt")
