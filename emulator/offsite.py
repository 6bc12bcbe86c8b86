"""Offsite-tuning emulator: build by layer drop, describe its layout, plug adapters back in.

Offsite-tuning (Xiao, Lin & Han 2023, arXiv:2302.04870) splits a model of n
blocks into an *adapter* (the bottom k and top k blocks, which clients train)
and a *middle* that the coordinator keeps. Clients get an *emulator*: the
adapter plus a compressed middle (uniform layer drop, optionally distilled),
with embeddings, final norm and head riding along frozen. After training, the
adapter blocks are plugged back into the full model in place of the
originals.

Everything here reaches into models through :mod:`emulator.architectures`, so
the same code serves BERT, GPT-2, OPT and the Llama family. The emulator is a
normal transformers model (its config's block count updated) that saves with
``save_pretrained`` and reloads with plain ``transformers``; a small JSON
layout saved beside it says which full-model block each emulator block came
from, which is what plug-in needs to map names back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor, nn
from transformers import PreTrainedModel

from emulator.architectures import (
    UnsupportedArchitectureError,
    blocks_prefix,
    num_blocks,
    set_num_blocks,
    spec_for,
    transformer_blocks,
)

LAYOUT_FILENAME = "offsite_layout.json"
LAYOUT_FORMAT = "fedsite-offsite-layout/1"
DEFAULT_KEEP_RATIO = 0.5


class EmulatorError(ValueError):
    """A user-caused problem building, loading or plugging in an emulator."""


@dataclass
class EmulatorLayout:
    """Which full-model block each emulator block is, and which blocks form the adapter.

    All indices are *full-model* block indices. The emulator's blocks are, in
    order, ``adapter_bottom + kept_middle + adapter_top``.
    ``blocks_prefix`` is the state-dict prefix of the block list (e.g.
    ``"bert.encoder.layer"``); it lets :func:`emulator_to_full_state` rename
    tensors without holding a model.
    """

    num_full_blocks: int
    adapter_bottom: list[int]
    adapter_top: list[int]
    kept_middle: list[int]
    blocks_prefix: str = ""
    model_type: str = ""
    distilled: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        order = self.emulator_blocks
        if len(set(order)) != len(order):
            raise EmulatorError(f"layout lists a block twice: {order}")
        if order != sorted(order):
            raise EmulatorError(f"layout blocks are not in model order: {order}")
        if order and (order[0] < 0 or order[-1] >= self.num_full_blocks):
            raise EmulatorError(
                f"layout block indices {order} out of range for {self.num_full_blocks} blocks"
            )

    @property
    def emulator_blocks(self) -> list[int]:
        """Full-model index of each emulator block, in emulator order."""
        return [*self.adapter_bottom, *self.kept_middle, *self.adapter_top]

    @property
    def num_emulator_blocks(self) -> int:
        return len(self.emulator_blocks)

    @property
    def dropped(self) -> list[int]:
        """Full-model blocks that the emulator does not contain."""
        present = set(self.emulator_blocks)
        return [i for i in range(self.num_full_blocks) if i not in present]

    @property
    def adapter_full_indices(self) -> list[int]:
        return [*self.adapter_bottom, *self.adapter_top]

    @property
    def adapter_emulator_indices(self) -> list[int]:
        bottom = len(self.adapter_bottom)
        top_start = bottom + len(self.kept_middle)
        return [*range(bottom), *range(top_start, top_start + len(self.adapter_top))]

    @property
    def middle_emulator_indices(self) -> list[int]:
        bottom = len(self.adapter_bottom)
        return list(range(bottom, bottom + len(self.kept_middle)))

    def emulator_to_full_index(self, i: int) -> int:
        blocks = self.emulator_blocks
        if not 0 <= i < len(blocks):
            raise EmulatorError(f"emulator block {i} out of range (emulator has {len(blocks)})")
        return blocks[i]

    def to_json(self) -> str:
        return json.dumps({"format": LAYOUT_FORMAT, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmulatorLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EmulatorError(f"emulator layout is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != LAYOUT_FORMAT:
            raise EmulatorError(f"emulator layout is not a {LAYOUT_FORMAT} document")
        try:
            return cls(**data)
        except TypeError as exc:
            raise EmulatorError(f"emulator layout has unexpected fields: {exc}") from exc

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / LAYOUT_FILENAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EmulatorLayout:
        path = Path(directory) / LAYOUT_FILENAME
        if not path.is_file():
            raise EmulatorError(f"{directory} has no {LAYOUT_FILENAME}: not a fedsite emulator")
        return cls.from_json(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# Choosing blocks


def default_adapter_layers(n: int) -> int:
    """2+2 in general; 1+1 when the model is too shallow to keep a useful middle."""
    return 1 if n <= 6 else 2


def uniform_keep(n: int, k: int) -> list[int]:
    """Indices (0..n-1) of k of n blocks spread uniformly, first and last kept.

    ``round(i * (n - 1) / (k - 1))`` for i in 0..k-1 (Python's round); k=1
    keeps the centre block.
    """
    if not 0 <= k <= n:
        raise EmulatorError(f"cannot keep {k} of {n} middle blocks")
    if k == 0:
        return []
    if k == 1:
        return [round((n - 1) / 2)]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def plan_layout(
    n: int,
    *,
    adapter_layers: int | None = None,
    keep: int | None = None,
    keep_ratio: float | None = None,
) -> EmulatorLayout:
    """The layout of an emulator for an n-block model (no model needed)."""
    k = default_adapter_layers(n) if adapter_layers is None else adapter_layers
    if k < 1:
        raise EmulatorError(f"adapter_layers must be >= 1, got {k}")
    if 2 * k >= n:
        raise EmulatorError(
            f"adapter_layers={k} leaves no middle in a {n}-block model (need 2*k < {n})"
        )
    middle = list(range(k, n - k))
    if keep is not None and keep_ratio is not None:
        raise EmulatorError("give keep or keep_ratio, not both")
    if keep is None:
        ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
        if not 0.0 < ratio <= 1.0:
            raise EmulatorError(f"keep_ratio must be in (0, 1], got {ratio}")
        keep = max(1, round(ratio * len(middle)))
    if not 0 <= keep <= len(middle):
        raise EmulatorError(f"keep must be in 0..{len(middle)} (the middle blocks), got {keep}")
    kept = [middle[i] for i in uniform_keep(len(middle), keep)]
    return EmulatorLayout(
        num_full_blocks=n,
        adapter_bottom=list(range(k)),
        adapter_top=list(range(n - k, n)),
        kept_middle=kept,
    )


# ---------------------------------------------------------------------------
# Building


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


# ---------------------------------------------------------------------------
# Names


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


# ---------------------------------------------------------------------------
# What leaves the coordinator


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


def save_emulator(emulator: PreTrainedModel, layout: EmulatorLayout, directory: str | Path) -> None:
    """``save_pretrained`` (safetensors) plus the layout JSON beside it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    emulator.save_pretrained(path, safe_serialization=True)
    layout.save(path)


def load_layout_checked(directory: str | Path, emulator: PreTrainedModel) -> EmulatorLayout:
    """The layout saved beside an emulator, checked against its block count."""
    layout = EmulatorLayout.load(directory)
    if num_blocks(emulator.config) != layout.num_emulator_blocks:
        raise EmulatorError(
            f"{directory}: emulator has {num_blocks(emulator.config)} blocks, "
            f"layout describes {layout.num_emulator_blocks}"
        )
    return layout
