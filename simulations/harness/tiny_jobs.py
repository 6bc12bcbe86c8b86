"""Tiny random models and the job files around them, for the tests and the benchmarks.

A 2-block BERT with hidden 32 and MiniLM's real tokenizer trains a round in
milliseconds, so a test or benchmark of the machinery (transport, engine,
Flower, Ray) measures the machinery, not the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from emulator.models import embedded_model_path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "coordinator" / "examples" / "data"
TRAIN = DATA / "wordnet_supersense.train.jsonl.gz"
VALIDATION = DATA / "wordnet_supersense.validation.jsonl.gz"


def make_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0, dropout: float = 0.0,
                   intermediate: int | None = None, max_positions: int = 128) -> Path:
    """A tiny random BERT (hidden 32 unless told) with the MiniLM tokenizer, saved as a Hugging Face folder."""
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=intermediate or 2 * hidden,
                        max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_job(folder: Path, model_dir: Path, *, clients: int, per_round: int, rounds: int,
             local_steps: int = 2, max_train_examples: int = 0, name: str = "tiny") -> Path:
    """A job file for the tiny model on WordNet (IID split), written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f"""
[job]
name = "{name}"
rounds = {rounds}
clients_per_round = {per_round}
min_clients = {max(1, per_round // 2)}
round_timeout_s = 600
seed = 0

[model]
path = "{model_dir}"
max_length = 24

[data]
validation = "{VALIDATION}"
validation_max_examples = 200

[train]
local_steps = {local_steps}
batch_size = 8
lr = 1e-3

[lora]
r = 4
alpha = 8

[simulation]
clients = {clients}
partition = "iid"
train_data = "{TRAIN}"
max_train_examples = {max_train_examples}
""")
    return path
