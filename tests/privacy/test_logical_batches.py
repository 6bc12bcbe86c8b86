"""Large logical batches in small physical chunks (client/trainer.py): the same update, bounded memory.

Per-sample gradients do not depend on which other rows share a forward pass, so a
logical batch computed in chunks must give the same clipped, noised DP-SGD step as
one physical batch drawn with the same seed and noise, and the same plain step as
well (gradient accumulation weighted by chunk size).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from client.trainer import TrainSettings, chunks_by_length, train_steps
from emulator.lora import add_lora, trainable_state
from emulator.models import embedded_model_path
from emulator.settings import LoraSettings
from emulator.tasks import EncodedExamples, encode
from localio.data import read_examples
from privacy.accounting import PrivacyLedger
from privacy.local_dp import make_private, unwrap

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def _model_and_data(n: int = 60) -> tuple[Any, EncodedExamples]:
    rows = read_examples(DATA, need_label=True)
    random.Random(0).shuffle(rows)
    rows = rows[:n]
    labels = sorted({r.label for r in rows if r.label})
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # chunks must not change masks
    config.num_labels = len(labels)
    model = add_lora(BertForSequenceClassification(config), LoraSettings(r=4), task="classification")
    data = encode(rows, tokenizer, task="classification", max_length=32,
                  label2id={label: i for i, label in enumerate(labels)})
    return model, data


def _train(model: Any, data: EncodedExamples, physical: int, *, dp: bool) -> dict[str, torch.Tensor]:
    settings = TrainSettings(local_steps=3, batch_size=24, lr=1e-2, physical_batch_size=physical)

    def privatize(m: Any, optimizer: Any, loader: Any) -> Any:
        return make_private(m, optimizer, loader, noise_multiplier=1.0, max_grad_norm=0.5,
                            ledger=PrivacyLedger(None), seed=7)

    try:
        train_steps(model, data, settings, generator=torch.Generator().manual_seed(3),
                    privatize=privatize if dp else None)
    finally:
        unwrap(model)
    return trainable_state(model)


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
def test_chunked_logical_batch_gives_the_update_of_one_physical_batch(dp: bool) -> None:
    model, data = _model_and_data()
    start = trainable_state(model)
    whole = _train(copy.deepcopy(model), data, physical=0, dp=dp)  # 0 = the logical batch at once
    chunked = _train(copy.deepcopy(model), data, physical=5, dp=dp)
    moved = max(float((whole[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-3  # the steps did something (and under DP, noise of std 1 * 0.5 / 24 per step)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_different_noise_seed_gives_a_different_update() -> None:
    """The comparison above is not vacuous: the noise really enters the update."""
    model, data = _model_and_data()
    first = _train(copy.deepcopy(model), data, physical=5, dp=True)
    settings = TrainSettings(local_steps=3, batch_size=24, lr=1e-2, physical_batch_size=5)
    other = copy.deepcopy(model)
    train_steps(other, data, settings, generator=torch.Generator().manual_seed(3),
                privatize=lambda m, o, loader: make_private(m, o, loader, noise_multiplier=1.0, max_grad_norm=0.5,
                                                            ledger=PrivacyLedger(None), seed=8))
    unwrap(other)
    second = trainable_state(other)
    assert max(float((first[n] - second[n]).abs().max()) for n in first) > 1e-3


def test_chunks_are_sorted_by_length_and_bounded() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    chunks = chunks_by_length([0, 2, 3, 4, 6], lengths, 2)
    assert chunks == [[3, 0], [4, 6], [2]]
    assert chunks_by_length([], lengths, 4) == [[]]  # an empty Poisson batch is still one (noise-only) step
