"""What an emulator gives away: how much of the full model it carries, and how much byte for byte.

The model owner ships the emulator to every client; these digests and counts
say what leaves the coordinator (layer drop ships the kept middle blocks
verbatim, distillation changes them). Counted by content, not by names or the
layout, so a mistake in either cannot hide a verbatim copy.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_digests(state: Mapping[str, Tensor]) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in state.items()}


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without tied duplicates (one name per storage)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel():
            continue
        seen.add(key)
        out[name] = t
    return out


@dataclass
class ExposureReport:
    """How much of the full model an emulator carries, and how much verbatim."""

    full_parameters: int
    emulator_parameters: int
    verbatim_parameters: int  # full-model parameters whose tensor ships byte-identical

    @property
    def size_fraction(self) -> float:
        return self.emulator_parameters / self.full_parameters

    @property
    def verbatim_fraction(self) -> float:
        return self.verbatim_parameters / self.full_parameters


def exposure(full_model: PreTrainedModel, emulator: PreTrainedModel) -> ExposureReport:
    """Fraction of the full model's parameters found byte-identical in the emulator.

    Counted by content hash (full-model tensors whose sha256 appears among the
    emulator's, each emulator tensor matched at most once), so it does not
    trust names or the layout: layer drop ships kept middle blocks verbatim,
    distillation changes them.
    """
    full = _unique_state(full_model)
    emu = _unique_state(emulator)
    # a multiset: each shipped tensor vouches for one full-model tensor, so identical
    # constants (fresh norm weights) in dropped blocks are not counted twice
    available = Counter(tensor_digest(t) for t in emu.values())
    verbatim = 0
    for t in full.values():
        digest = tensor_digest(t)
        if available[digest] > 0:
            available[digest] -= 1
            verbatim += t.numel()
    return ExposureReport(
        full_parameters=sum(t.numel() for t in full.values()),
        emulator_parameters=sum(t.numel() for t in emu.values()),
        verbatim_parameters=verbatim,
    )
