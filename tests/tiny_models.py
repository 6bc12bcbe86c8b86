"""Tiny random models of each supported family, for breadth tests.

Built from transformers configs (nothing to download); 4 blocks, hidden 32,
so a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
)

FAMILIES = ("bert", "gpt2", "opt", "llama")
VOCAB = 128


def tiny_config(family: str, num_labels: int = 3, layers: int = 4) -> PretrainedConfig:
    config: PretrainedConfig
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=64)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                           max_position_embeddings=128, pad_token_id=1)
    elif family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                             max_position_embeddings=128, pad_token_id=0)
    else:
        raise ValueError(family)
    # transformers 5 configs take num_labels only through **kwargs (untyped); the
    # property setter builds the same id2label/label2id maps
    config.num_labels = num_labels
    return config


def tiny_model(family: str, task: str = "classification", seed: int = 0,
               layers: int = 4) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config(family, layers=layers)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_config(config)
    model.eval()
    return model


def tiny_batch(batch: int = 4, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
