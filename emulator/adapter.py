"""The adapter's tensors across emulator and full model: their names, LoRA on them, and plug-in.

A client trains the adapter blocks (and the task head) under the emulator's
block numbers; the coordinator renames them with the layout and copies them
into the full model in place of the originals (:func:`plug_in`). With
``[offsite] adapter_lora`` the clients train LoRA factors on those blocks
instead (:func:`adapter_lora_config`), folded in before plug-in.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor, nn
from transformers import PreTrainedModel

from emulator.architectures import blocks_prefix, num_blocks, spec_for, transformer_blocks
from emulator.layout import EmulatorError, EmulatorLayout


def _block_pattern(prefix: str) -> re.Pattern[str]:
    # Matches "<prefix>.<i>." anywhere, so peft-wrapped names
    # ("base_model.model.bert.encoder.layer.0....") map too.
    return re.compile(r"(^|\.)" + re.escape(prefix) + r"\.(\d+)\.")


def block_index(name: str, prefix: str) -> int | None:
    """The block index in a state-dict name, or None if the name is not in a block."""
    match = _block_pattern(prefix).search(name)
    return int(match.group(2)) if match else None


def adapter_parameter_names(
    model_or_emulator: PreTrainedModel, layout: EmulatorLayout, *, emulator: bool
) -> list[str]:
    """State-dict names of the adapter blocks' tensors, in state-dict order.

    ``emulator=True``: names as in the emulator (blocks numbered 0..m-1);
    ``emulator=False``: names as in the full model. The task head is not
    included (see :func:`head_parameter_names`).
    """
    prefix = blocks_prefix(model_or_emulator)
    wanted = set(layout.adapter_emulator_indices if emulator else layout.adapter_full_indices)
    expected = layout.num_emulator_blocks if emulator else layout.num_full_blocks
    actual = num_blocks(model_or_emulator.config)
    if actual != expected:
        raise EmulatorError(
            f"model has {actual} blocks but the layout's {'emulator' if emulator else 'full model'}"
            f" has {expected}; pass emulator={not emulator}?"
        )
    return [
        name
        for name in model_or_emulator.state_dict()
        if block_index(name, prefix) in wanted
    ]


def head_parameter_names(model: PreTrainedModel) -> list[str]:
    """State-dict names of the classification head (empty for a causal LM)."""
    head = spec_for(model).classifier_head
    return [name for name in model.state_dict() if name.split(".")[0] == head]


def adapter_lora_config(
    emulator: PreTrainedModel,
    layout: EmulatorLayout,
    *,
    r: int = 8,
    alpha: int | None = None,
    target_modules: Sequence[str] | str | None = None,
    dropout: float = 0.0,
    train_head: bool = False,
) -> Any:
    """A peft ``LoraConfig`` that puts LoRA on the adapter blocks of the emulator only.

    ``target_modules`` defaults to the registry's ``lora_targets``; pass
    ``"all-linear"`` for every linear layer of those blocks. ``train_head``
    trains the classification head fully beside the factors (peft's
    ``modules_to_save``). Merge (``merge_and_unload``) before taking the
    adapter state for plug-in.
    """
    if target_modules is None:
        targets = list(spec_for(emulator).lora_targets)
    elif target_modules == "all-linear":
        # peft refuses layers_to_transform with the "all-linear" shorthand: spell it out
        blocks = transformer_blocks(emulator)
        targets = sorted({
            name.rsplit(".", 1)[-1]
            for i in layout.adapter_emulator_indices
            for name, module in blocks[i].named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        })
    elif isinstance(target_modules, str):
        targets = [target_modules]
    else:
        targets = list(target_modules)
    return LoraConfig(
        r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
        target_modules=targets,
        layers_to_transform=layout.adapter_emulator_indices,
        layers_pattern=layout.blocks_prefix.split(".")[-1],
        modules_to_save=[spec_for(emulator).classifier_head] if train_head else None,
        fan_in_fan_out=spec_for(emulator).family == "gpt2",  # GPT-2 keeps its projections as Conv1D
        bias="none",
    )


def emulator_to_full_state(
    adapter_state: Mapping[str, Tensor], layout: EmulatorLayout
) -> dict[str, Tensor]:
    """Rename emulator-indexed adapter tensors to full-model names.

    Tensors outside the blocks (a task head) keep their names. A tensor of a
    *middle* emulator block has no place in the full model and is refused.
    """
    if not layout.blocks_prefix:
        raise EmulatorError("layout has no blocks_prefix; build it with build_emulator")
    pattern = _block_pattern(layout.blocks_prefix)
    adapter = set(layout.adapter_emulator_indices)
    out: dict[str, Tensor] = {}
    for name, tensor in adapter_state.items():
        match = pattern.search(name)
        if match is None:
            out[name] = tensor
            continue
        i = int(match.group(2))
        if i not in adapter:
            raise EmulatorError(
                f"{name}: emulator block {i} is a middle block, not part of the adapter"
            )
        full = layout.emulator_to_full_index(i)
        start, end = match.span(2)
        out[name[:start] + str(full) + name[end:]] = tensor
    return out


def plug_in(
    full_model: PreTrainedModel,
    adapter_state: Mapping[str, Tensor],
    layout: EmulatorLayout,
) -> PreTrainedModel:
    """A copy of ``full_model`` with the adapter blocks (and head, if given) replaced.

    ``adapter_state`` is emulator-named (as a client trains it). Every tensor
    must be finite, name a tensor of the full model and match its shape;
    otherwise nothing is changed and :class:`EmulatorError` is raised.
    """
    if num_blocks(full_model.config) != layout.num_full_blocks:
        raise EmulatorError(
            f"layout is for a {layout.num_full_blocks}-block model, "
            f"this one has {num_blocks(full_model.config)}"
        )
    renamed = emulator_to_full_state(adapter_state, layout)
    target = full_model.state_dict()
    for name, tensor in renamed.items():
        if name not in target:
            raise EmulatorError(f"{name}: no such tensor in the full model")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise EmulatorError(
                f"{name}: shape {tuple(tensor.shape)} != full model's {tuple(target[name].shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise EmulatorError(f"{name}: refusing to plug in non-finite values")
    merged = copy.deepcopy(full_model)
    with torch.no_grad():
        live = merged.state_dict()
        for name, tensor in renamed.items():
            live[name].copy_(tensor.to(dtype=live[name].dtype, device=live[name].device))
    return merged
