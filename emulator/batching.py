"""Tokenized examples and their batches, for the reference trainers (evaluation, distillation, refinement).

Examples are kept unpadded; a batch is padded on the right when drawn
(:func:`collate`), and :func:`shuffled_batches` gives index batches whose order
depends only on a seed, so a resumed run can skip ahead.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    """Tokenized examples without padding; batches are padded when drawn."""

    input_ids: list[list[int]]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    labels: Sequence[int] | None = None,
) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=[list(x) for x in ids], labels=None if labels is None else list(labels))


def collate(data: Encoded, index: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    rows = [data.input_ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):  # right padding
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if data.labels is not None:
        batch["labels"] = torch.tensor([data.labels[i] for i in index], dtype=torch.long)
    return batch


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad or 0)


def shuffled_batches(n: int, batch_size: int, seed: int, steps: int | None = None) -> Iterator[list[int]]:
    """Index batches over ``n`` examples, epoch after reshuffled epoch (a short last batch is dropped),
    for ``steps`` batches or forever; the order depends only on ``seed``, so a resumed run can skip ahead."""
    rng = random.Random(seed)
    done = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1
