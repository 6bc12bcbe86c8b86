"""An offsite emulator's layout: which full-model blocks it holds, which form the adapter, and the plan that picks them.

Offsite-tuning (Xiao, Lin & Han 2023, arXiv:2302.04870) splits a model of n
blocks into an *adapter* (the bottom k and top k blocks, which clients train)
and a *middle* that the coordinator keeps; the emulator holds the adapter and
a uniformly thinned middle. The layout is a small JSON document saved beside
the emulator's weights: plug-in needs it to map emulator block numbers back to
the full model's, and it needs no model to be read or planned.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from emulator.architectures import num_blocks
from emulator.settings import DEFAULT_KEEP_RATIO

LAYOUT_FILENAME = "offsite_layout.json"
LAYOUT_FORMAT = "fedsite-offsite-layout/1"


class EmulatorError(ValueError):
    """A user-caused problem building, loading or plugging in an emulator."""


@dataclass
class EmulatorLayout:
    """Which full-model block each emulator block is, and which blocks form the adapter.

    All indices are *full-model* block indices. The emulator's blocks are, in
    order, ``adapter_bottom + kept_middle + adapter_top``.
    ``blocks_prefix`` is the state-dict prefix of the block list (e.g.
    ``"bert.encoder.layer"``); it lets :func:`emulator.adapter.emulator_to_full_state` rename
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


def load_layout_checked(directory: str | Path, emulator: PreTrainedModel) -> EmulatorLayout:
    """The layout saved beside an emulator, checked against its block count."""
    layout = EmulatorLayout.load(directory)
    if num_blocks(emulator.config) != layout.num_emulator_blocks:
        raise EmulatorError(
            f"{directory}: emulator has {num_blocks(emulator.config)} blocks, "
            f"layout describes {layout.num_emulator_blocks}"
        )
    return layout
