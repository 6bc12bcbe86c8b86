"""Mean pooling from stock parts (emulator/pooling.py): what it computes, that LoRA leaves it alone,
and that the export still loads with plain transformers and peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emulator.lora import add_lora, merged_copy, trainable_shapes
from emulator.models import ModelLoadError, load_model
from emulator.pooling import pooling_block_index
from emulator.settings import LoraSettings
from tests.tiny_models import tiny_model

TEXTS = ["dog: a member of the genus Canis", "run: move fast by using one's feet", "red: a colour"]


def _batch(folder: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def test_the_cls_output_is_the_layer_norm_of_the_masked_mean(tiny_bert_dir: Path) -> None:
    plain: Any = load_model(tiny_bert_dir, "classification", ["a", "b"])
    pooled: Any = load_model(tiny_bert_dir, "classification", ["a", "b"], pooling="mean")
    batch = _batch(tiny_bert_dir)
    with torch.no_grad():
        last = plain.bert(**batch).last_hidden_state  # (B, T, H): the original last block's output
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (last * mask).sum(1) / mask.sum(1)  # padding excluded
        expected = torch.nn.functional.layer_norm(mean, mean.shape[-1:], eps=plain.config.layer_norm_eps)
        cls = pooled.bert(**batch).last_hidden_state[:, 0]
        single = pooled.bert(**{k: v[2:3, : int(batch["attention_mask"][2].sum())] for k, v in batch.items()})
    assert pooled.config.num_hidden_layers == plain.config.num_hidden_layers + 1
    assert pooling_block_index(pooled.config) == plain.config.num_hidden_layers
    torch.testing.assert_close(cls, expected, atol=2e-3, rtol=0)  # the token's own state enters at 1e-4
    torch.testing.assert_close(single.last_hidden_state[0, 0], cls[2], atol=1e-5, rtol=0)  # padding-free
    with torch.no_grad():
        other = plain.bert(**batch).last_hidden_state[:, 0]
    assert (cls - other).abs().max() > 0.1  # not the [CLS] state: the test can fail


def test_lora_never_wraps_or_trains_the_pooling_block(tiny_bert_dir: Path) -> None:
    model = add_lora(load_model(tiny_bert_dir, "classification", ["a", "b"], pooling="mean"), LoraSettings(r=2),
                     task="classification")
    index = pooling_block_index(model.config)
    assert index is not None
    names = list(trainable_shapes(model))
    assert names and not any(f"layer.{index}." in n for n in names)
    assert any(f"layer.{index - 1}." in n for n in names)  # the blocks below are wrapped as usual


def test_export_loads_with_plain_transformers_and_peft(tiny_bert_dir: Path, tmp_path: Path) -> None:
    base = load_model(tiny_bert_dir, "classification", ["a", "b", "c"], pooling="mean")
    base.save_pretrained(str(tmp_path / "base"))
    model = add_lora(base, LoraSettings(r=2), task="classification")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter
    model.eval()
    batch = _batch(tiny_bert_dir)
    with torch.no_grad():
        expected = model(**batch).logits
    merged_copy(model).save_pretrained(str(tmp_path / "final"))
    model.save_pretrained(str(tmp_path / "adapter"))
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final")).eval()
    reloaded_base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    adapter = PeftModel.from_pretrained(reloaded_base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(adapter(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_mean_pooling_is_refused_for_decoder_models(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(str(tmp_path / "llama"))
    folder = tmp_path / "llama"
    with pytest.raises(ModelLoadError, match="BERT-family"):
        load_model(folder, "classification", ["a", "b", "c"], pooling="mean")


def test_top_blocks_wraps_only_the_top_trained_blocks(tiny_bert_dir: Path) -> None:
    """[lora] top_blocks counts the model's own blocks, below the pooling block."""
    model = add_lora(load_model(tiny_bert_dir, "classification", ["a", "b"], pooling="mean"),
                     LoraSettings(r=2, top_blocks=2), task="classification")
    wrapped = {int(n.split("layer.")[1].split(".")[0]) for n in trainable_shapes(model) if "layer." in n}
    assert wrapped == {2, 3}  # of blocks 0-3, with the pooling block at 4
    with pytest.raises(ValueError, match="top_blocks = 9"):
        add_lora(load_model(tiny_bert_dir, "classification", ["a", "b"]), LoraSettings(top_blocks=9),
                 task="classification")


def test_a_dotted_target_wraps_that_module_outside_the_blocks(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """lora.target_modules = ["pooler.dense"]: a feature adapter above the frozen encoder (with mean pooling,
    whose block list LoRA is otherwise restricted to); the adapter saves and loads with plain peft."""
    model = add_lora(load_model(tiny_bert_dir, "classification", ["a", "b"], pooling="mean"),
                     LoraSettings(r=2, target_modules=("pooler.dense",)), task="classification")
    wrapped = {n.split(".lora_")[0] for n in trainable_shapes(model) if ".lora_" in n}
    assert wrapped == {"base_model.model.bert.pooler.dense"}
    model.save_pretrained(str(tmp_path / "adapter"))
    base = load_model(tiny_bert_dir, "classification", ["a", "b"], pooling="mean")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert {n.split(".lora_")[0] for n, _ in reloaded.named_parameters() if ".lora_" in n} == wrapped
