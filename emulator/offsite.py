"""Offsite-tuning emulator: build one from a full model by layer drop, and save it.

The emulator is the adapter (bottom k and top k blocks) plus a compressed
middle (uniform layer drop, optionally distilled afterwards by
:mod:`emulator.distill`), with embeddings, final norm and head riding along
frozen. Everything here reaches into models through
:mod:`emulator.architectures`, so the same code serves BERT, GPT-2, OPT and the
Llama family. The emulator is a normal transformers model (its config's block
count updated) that saves with ``save_pretrained`` and reloads with plain
``transformers``; its :class:`emulator.layout.EmulatorLayout` is saved beside
it. Which blocks to keep is :func:`emulator.layout.plan_layout`'s job; mapping a
trained adapter back onto the full model is :mod:`emulator.adapter`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from emulator.architectures import (
    UnsupportedArchitectureError,
    blocks_prefix,
    num_blocks,
    set_num_blocks,
    spec_for,
    transformer_blocks,
)
from emulator.layout import EmulatorError, EmulatorLayout, plan_layout


def _set_blocks(model: PreTrainedModel, blocks: nn.ModuleList) -> None:
    spec = spec_for(model)
    parent_path, _, attr = spec.blocks_path.rpartition(".")
    parent: nn.Module = model.base_model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    setattr(parent, attr, blocks)


def renumber_layer_indices(blocks: Iterable[nn.Module]) -> None:
    """Give every ``layer_idx`` inside block i the value i.

    Attention modules index the KV cache by ``layer_idx``; after a layer drop
    the kept blocks still carry their full-model numbers, which point past the
    cache the emulator's config allocates (IndexError under generation).
    """
    for i, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i  # type: ignore[assignment]


def apply_layout(model: PreTrainedModel, layout: EmulatorLayout) -> PreTrainedModel:
    """A deep copy of ``model`` reduced to the layout's blocks (input untouched)."""
    n = num_blocks(model.config)
    if n != layout.num_full_blocks:
        raise EmulatorError(
            f"layout is for a {layout.num_full_blocks}-block model, this one has {n}"
        )
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError(
            "scale_attn_by_inverse_layer_idx=True ties attention scaling to block position; "
            "a layer-dropped emulator cannot preserve it"
        )
    emulator = copy.deepcopy(model)
    old = transformer_blocks(emulator)
    new = nn.ModuleList([old[i] for i in layout.emulator_blocks])
    _set_blocks(emulator, new)
    renumber_layer_indices(new)
    layer_types = getattr(model.config, "layer_types", None)
    set_num_blocks(emulator.config, len(new))
    if isinstance(layer_types, list) and len(layer_types) == n:
        emulator.config.layer_types = [layer_types[i] for i in layout.emulator_blocks]
    layout.blocks_prefix = blocks_prefix(model)
    layout.model_type = str(model.config.model_type)
    return emulator


def build_emulator(
    model: PreTrainedModel,
    *,
    adapter_layers: int | None = None,
    keep: int | None = None,
    keep_ratio: float | None = None,
) -> tuple[PreTrainedModel, EmulatorLayout]:
    """Emulator by uniform layer drop: bottom/top ``adapter_layers`` blocks + kept middle.

    ``adapter_layers`` defaults to 2 (1 for models of 6 blocks or fewer);
    ``keep`` (a count) or ``keep_ratio`` (of the middle blocks, default 0.5)
    sets how many middle blocks remain. Returns a deep copy; ``model`` is not
    changed.
    """
    layout = plan_layout(
        num_blocks(model.config), adapter_layers=adapter_layers, keep=keep, keep_ratio=keep_ratio
    )
    return apply_layout(model, layout), layout


def save_emulator(emulator: PreTrainedModel, layout: EmulatorLayout, directory: str | Path) -> None:
    """``save_pretrained`` (safetensors) plus the layout JSON beside it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    emulator.save_pretrained(path, safe_serialization=True)
    layout.save(path)

