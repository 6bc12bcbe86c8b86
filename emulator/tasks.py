"""Turning examples into batches, and measuring a model on them.

One tokenisation for the coordinator's evaluation and the clients' training,
so both see the same inputs. Batches are padded to their longest row (short
WordNet glosses make fixed-length padding several times slower on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from emulator.prefix import FrozenPrefix

from localio.data import Example


@dataclass
class EncodedExamples(Dataset):
    """Token ids per example and, for classification, the class index."""

    input_ids: list[list[int]]
    labels: list[int] | None
    pad_id: int
    task: str
    # what is computed from these examples once and reused (a client's frozen-prefix states, its data seed); not data
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], (self.labels[index] if self.labels is not None else -1)

    def collate(self, rows: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max((len(ids) for ids, _ in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "classification":
            batch["labels"] = torch.tensor([label for _, label in rows], dtype=torch.long)
        else:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch


def encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    max_length: int,
    label2id: dict[str, int] | None = None,
) -> EncodedExamples:
    texts = [e.text for e in examples]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    labels = None
    if task == "classification":
        assert label2id is not None
        labels = [label2id[e.label] for e in examples if e.label is not None]
        if len(labels) != len(examples):
            raise ValueError("every classification example needs a label")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedExamples(input_ids=ids, labels=labels, pad_id=int(pad), task=task)


def batches(data: EncodedExamples, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of similar-length rows (sorted by length): far less padding to compute on."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        yield data.collate([data[i] for i in order[start : start + batch_size]])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: EncodedExamples, *, batch_size: int = 64,
             prefix: FrozenPrefix | None = None) -> dict[str, float]:
    """Accuracy and mean loss (classification) or perplexity (causal LM).

    With ``prefix`` (``data``'s frozen-prefix states for ``model``) only the model's top runs."""
    if prefix is not None:
        model = prefix.view
    was_training = model.training
    model.eval()
    total_loss, correct, count, tokens = 0.0, 0, 0, 0
    if prefix is None:
        stream: Iterator[dict[str, torch.Tensor]] = batches(data, batch_size)
    else:
        order = sorted(range(len(data)), key=lambda i: len(prefix.states[i]))
        stream = (prefix.collate(order[s : s + batch_size]) for s in range(0, len(order), batch_size))
    for batch in stream:
        out = model(**batch)
        if data.task == "classification":
            n = batch["labels"].shape[0]
            total_loss += float(out.loss) * n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += n
        else:
            n_tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * n_tokens
            tokens += n_tokens
    model.train(was_training)
    if data.task == "classification":
        return {"val_accuracy": correct / max(count, 1), "val_loss": total_loss / max(count, 1)}
    mean_nll = total_loss / max(tokens, 1)
    return {"val_perplexity": math.exp(min(mean_nll, 50.0)), "val_loss": mean_nll}
