"""The frozen prefix (emulator/prefix.py): cached states plus the model's top give the model's own
outputs, and training on them gives the update of training the whole model (DP-SGD included)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from client.trainer import TrainSettings, train_steps
from emulator.lora import add_lora, trainable_state
from emulator.models import embedded_model_path
from emulator.pooling import add_mean_pooling_block
from emulator.prefix import PREFIX_FILE, compute_prefix, cut_index, load_prefix, prefix_fingerprint, store_prefix
from emulator.settings import LoraSettings
from emulator.tasks import EncodedExamples, encode
from localio.data import read_examples
from privacy.accounting import PrivacyLedger
from privacy.local_dp import make_private, unwrap
from tests.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def _setup(top_blocks: int, *, dropout: float = 0.0, n: int = 48) -> tuple[Any, EncodedExamples]:
    rows = read_examples(DATA, need_label=True)
    random.Random(0).shuffle(rows)
    rows = rows[:n]
    labels = sorted({r.label for r in rows if r.label})
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    config.num_labels = len(labels)
    base = BertForSequenceClassification(config)
    add_mean_pooling_block(base)
    model: Any
    if top_blocks:
        model = add_lora(base, LoraSettings(r=4, top_blocks=top_blocks), task="classification")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)  # a trained-looking adapter, so the top really changes the outputs
    else:  # only the head trains: a linear probe
        for name, param in base.named_parameters():
            param.requires_grad_(name.startswith("classifier."))
        model = base
    data = encode(rows, tokenizer, task="classification", max_length=32,
                  label2id={label: i for i, label in enumerate(labels)})
    return model, data


@pytest.mark.parametrize("top_blocks", [1, 2, 0], ids=["top1", "top2", "head-only"])
def test_the_top_on_cached_states_gives_the_models_outputs(top_blocks: int) -> None:
    model, data = _setup(top_blocks, dropout=0.1)  # eval mode: dropout off in both
    cut = cut_index(model)
    assert cut == (3 - top_blocks if top_blocks else 4)  # 3 blocks + the pooling block
    assert cut is not None
    prefix = compute_prefix(model, data, cut)
    if not top_blocks:
        assert all(s.shape[0] == 1 for s in prefix.states)  # the pooler reads the first token only
    model.eval()
    prefix.view.eval()
    rows = list(range(len(data)))
    with torch.no_grad():
        whole = model(**data.collate([data[i] for i in rows]))
        top = prefix.view(**prefix.collate(rows))
    torch.testing.assert_close(top.logits, whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top.loss, whole.loss)
    inner = model.get_base_model() if top_blocks else model
    assert len(inner.bert.encoder.layer) == 4 and type(inner.bert.embeddings).__name__ == "BertEmbeddings"  # untouched


def test_a_model_that_trains_its_bottom_or_is_not_bert_is_not_cut() -> None:
    model, _ = _setup(0)
    next(model.bert.embeddings.parameters()).requires_grad_(True)
    assert cut_index(model) is None
    assert cut_index(tiny_model("llama")) is None
    full, _ = _setup(3)  # LoRA on every block: nothing below the first trained block
    assert cut_index(full) == 0


def _train(model: Any, data: EncodedExamples, *, cached: bool, dp: bool) -> dict[str, torch.Tensor]:
    settings = TrainSettings(local_steps=3, batch_size=16, lr=1e-2, physical_batch_size=6)
    prefix = compute_prefix(model, data, cut_index(model)) if cached else None  # type: ignore[arg-type]

    def privatize(m: Any, optimizer: Any, loader: Any) -> Any:
        return make_private(m, optimizer, loader, noise_multiplier=1.0, max_grad_norm=0.5,
                            ledger=PrivacyLedger(None), seed=11)

    try:
        train_steps(model, data, settings, generator=torch.Generator().manual_seed(5),
                    privatize=privatize if dp else None, prefix=prefix)
    finally:
        unwrap(prefix.view if prefix is not None else model)
    return trainable_state(model)


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
@pytest.mark.parametrize("top_blocks", [1, 0], ids=["top1", "head-only"])
def test_training_on_cached_states_is_training_the_model(top_blocks: int, dp: bool) -> None:
    model, data = _setup(top_blocks)
    start = trainable_state(model)
    cached = _train(copy.deepcopy(model), data, cached=True, dp=dp)
    whole = _train(copy.deepcopy(model), data, cached=False, dp=dp)
    assert max(float((whole[n] - start[n]).abs().max()) for n in start) > 1e-3
    for name in whole:
        torch.testing.assert_close(cached[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_on_cached_states_scores_the_model() -> None:
    from emulator.tasks import evaluate

    model, data = _setup(1, dropout=0.1)
    cut = cut_index(model)
    assert cut is not None
    prefix = compute_prefix(model, data, cut)
    whole, cached = evaluate(model, data, batch_size=7), evaluate(model, data, batch_size=7, prefix=prefix)
    assert cached["val_accuracy"] == whole["val_accuracy"]
    assert cached["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


@pytest.mark.parametrize("top_blocks", [1, 0], ids=["top1", "head-only"])
def test_stored_states_are_reused_only_for_the_same_frozen_weights_and_data(tmp_path: Path, top_blocks: int) -> None:
    model, data = _setup(top_blocks)
    cut = cut_index(model)
    assert cut is not None
    prefix = compute_prefix(model, data, cut)
    path = tmp_path / PREFIX_FILE
    fingerprint = prefix_fingerprint(model, data, cut)
    assert store_prefix(prefix, path, fingerprint)
    loaded = load_prefix(path, model, cut, fingerprint)
    assert loaded is not None and loaded.labels == prefix.labels
    assert all(torch.equal(a, b) for a, b in zip(loaded.states, prefix.states, strict=True))
    batch = loaded.collate(list(range(8)))
    torch.testing.assert_close(loaded.view(**batch).logits, prefix.view(**prefix.collate(list(range(8)))).logits)

    fewer = EncodedExamples(input_ids=data.input_ids[:-1], labels=(data.labels or [])[:-1], pad_id=data.pad_id,
                            task=data.task)
    assert prefix_fingerprint(model, fewer, cut) != fingerprint  # other data
    with torch.no_grad():  # another frozen model below the cut
        next(p for n, p in model.named_parameters() if "word_embeddings" in n).add_(1e-3)
    changed = prefix_fingerprint(model, data, cut)
    assert changed != fingerprint and load_prefix(path, model, cut, changed) is None
    path.write_bytes(b"not a safetensors file")
    assert load_prefix(path, model, cut, fingerprint) is None  # unreadable: recomputed, not a crash
