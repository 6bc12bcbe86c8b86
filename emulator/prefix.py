"""Computing a model's frozen bottom once: cached states and the trainable top that runs on them.

When only the top of a model trains (LoRA on the top blocks, or only the task head), the
blocks below the first trained one are a fixed function of each example. A client that
runs them at every step of every round recomputes the same numbers: with LoRA on the top
block of MiniLM that is five of the seven blocks' forward pass, and with a linear probe all
of them. :class:`FrozenPrefix` runs them once per example (in eval mode: no dropout below
the cut) and keeps their output; :func:`top_view` is the model above the cut, sharing the
model's own modules, that training calls on the cached states. Per-sample gradients,
clipping and noise are unchanged (the cached states are not trained); only the arithmetic
is saved, which under DP buys the large batches and many steps the noise needs.

BERT-family sequence classifiers only: their embeddings module is the whole prefix of the
forward pass, so handing the transformers forward ``inputs_embeds`` that *are* the cached
states (through a pass-through embeddings module) reuses its own mask handling, pooler and
loss. Other families add position information inside the model's forward; they train
without a cache.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from emulator.architectures import UnsupportedArchitectureError, spec_for_config, transformer_blocks
from localio.atomic import atomic_open

log = logging.getLogger("fedsite.prefix")

PREFIX_FILE = "frozen-prefix.safetensors"
MAX_STORED_BYTES = 2 << 30  # larger caches stay in memory only (a full-sequence cut of a big dataset)


class PassThroughEmbeddings(nn.Module):
    """Stands in for a BERT embeddings module: returns ``inputs_embeds`` (the cached states) as they are."""

    def forward(self, input_ids: Any = None, inputs_embeds: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("the top of a model runs on cached states: pass inputs_embeds")
        return inputs_embeds


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the module whose forward takes the batch)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _shell(module: nn.Module) -> nn.Module:
    """A shallow copy whose children can be replaced without touching the original (parameters shared)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def cut_index(model: nn.Module) -> int | None:
    """Index of the first block with trained parameters (the number of blocks if only the head trains),
    or None when the model cannot be cut (not a BERT-family classifier, or something below trains)."""
    inner = _hf_model(model)
    config = getattr(inner, "config", None)
    try:
        if config is None or spec_for_config(config).family != "bert":
            return None
    except UnsupportedArchitectureError:
        return None
    base = getattr(inner, "base_model", None)
    embeddings = getattr(base, "embeddings", None)
    if not isinstance(embeddings, nn.Module) or any(p.requires_grad for p in embeddings.parameters()):
        return None
    blocks = transformer_blocks(inner)  # type: ignore[arg-type]
    for index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    return len(blocks)


def top_view(model: nn.Module, cut: int) -> nn.Module:
    """The model above block ``cut``: call it with ``inputs_embeds`` = the input of block ``cut``.

    A module tree of shells around the model's own modules: the same parameters, so training the
    view trains the model, and nothing of the original module tree is changed.
    """
    inner = _hf_model(model)
    base_name = str(inner.base_model_prefix)  # "bert" / "roberta"
    view = _shell(inner)
    base = _shell(getattr(inner, base_name))
    base.embeddings = PassThroughEmbeddings()
    encoder = _shell(base.get_submodule("encoder"))
    encoder.layer = nn.ModuleList(list(transformer_blocks(inner))[cut:])  # type: ignore[arg-type]
    base.encoder = encoder
    setattr(view, base_name, base)
    return view


@dataclass
class FrozenPrefix:
    """The input of block ``cut`` for every example, computed once, and the view that trains on it."""

    cut: int
    states: list[torch.Tensor]  # per example (length, hidden); only the first token when no block trains
    labels: list[int]
    view: nn.Module
    model_id: int = 0  # id() of the model the states were computed with (a cache keeps one per model object)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.states[i] for i in indices]
        hidden = rows[0].shape[-1] if rows else self.states[0].shape[-1]
        width = max((len(r) for r in rows), default=1)
        embeds = torch.zeros((len(rows), width, hidden), dtype=self.states[0].dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            embeds[i, : len(row)] = row
            mask[i, : len(row)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}

    def lengths(self) -> list[int]:
        return [len(s) for s in self.states]


@torch.inference_mode()
def compute_prefix(model: nn.Module, data: Any, cut: int, *, batch_size: int = 128) -> FrozenPrefix:
    """Run the frozen blocks below ``cut`` over ``data`` (an :class:`emulator.tasks.EncodedExamples`)."""
    inner = _hf_model(model)
    base = getattr(inner, str(inner.base_model_prefix))
    blocks = transformer_blocks(inner)  # type: ignore[arg-type]
    was_training = inner.training
    inner.eval()
    states: list[torch.Tensor] = [torch.empty(0)] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = data.collate([data[i] for i in chunk])
            out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True)
            hidden = out.hidden_states[cut]  # the input of block `cut` (index 0: the embeddings' output)
            for row, index in enumerate(chunk):
                keep = 1 if cut >= len(blocks) else int(batch["attention_mask"][row].sum())
                states[index] = hidden[row, :keep].clone()
    finally:
        inner.train(was_training)
    labels = list(data.labels) if data.labels is not None else [-1] * len(data)
    return FrozenPrefix(cut=cut, states=states, labels=labels, view=top_view(model, cut))


def prefix_fingerprint(model: nn.Module, data: Any, cut: int) -> str:
    """What the cached states are a function of: the frozen weights below ``cut`` (embeddings included),
    the cut, and the examples. A stored cache is reused only when all three match."""
    inner = _hf_model(model)
    base = getattr(inner, str(inner.base_model_prefix))
    digest = hashlib.sha256(f"fedsite-prefix-v1 cut={cut} n={len(data)}".encode())
    modules: list[nn.Module] = [base.embeddings, *list(transformer_blocks(inner))[:cut]]  # type: ignore[arg-type]
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr((data.input_ids, data.labels)).encode())
    return digest.hexdigest()


def store_prefix(prefix: FrozenPrefix, path: Path, fingerprint: str) -> bool:
    """Write the states atomically (safetensors: flat states, per-example lengths, labels); False when they
    are too large to be worth a file (the cache then lives in memory only)."""
    lengths = torch.tensor(prefix.lengths(), dtype=torch.int64)
    flat = torch.cat(prefix.states) if prefix.states else torch.empty(0)
    if flat.numel() * flat.element_size() > MAX_STORED_BYTES:
        return False
    blob = save({"states": flat.contiguous(), "lengths": lengths,
                 "labels": torch.tensor(prefix.labels, dtype=torch.int64)},
                metadata={"fingerprint": fingerprint, "cut": str(prefix.cut)})
    with atomic_open(path, "wb") as handle:
        handle.write(blob)
    return True


def load_prefix(path: Path, model: nn.Module, cut: int, fingerprint: str) -> FrozenPrefix | None:
    """The states stored by :func:`store_prefix` if ``path`` holds them for this ``fingerprint``, else None
    (missing, another model, cut or data, or unreadable: the caller recomputes and overwrites)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:  # one read: the metadata, then the tensors
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            lengths = [int(n) for n in handle.get_tensor("lengths").tolist()]
            states = list(torch.split(handle.get_tensor("states"), lengths)) if lengths else []
            labels = [int(y) for y in handle.get_tensor("labels").tolist()]
    except (OSError, SafetensorError, KeyError, RuntimeError, ValueError) as err:
        log.warning("ignoring the unreadable frozen-prefix cache %s (%s); recomputing it", path, err)
        return None
    if len(states) != len(labels):
        return None
    return FrozenPrefix(cut=cut, states=states, labels=labels, view=top_view(model, cut))
