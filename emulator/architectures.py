"""Where the parts of each supported transformer family live.

Everything in fedsite that reaches inside a model (LoRA targets, the offsite
emulator's layer drop, plug-in) asks this registry instead of hard-coding
attribute paths, so adding an architecture is one entry here.

Paths are relative to the model's *base model* (``model.base_model`` in
transformers: ``bert`` for BERT, ``transformer`` for GPT-2, ``model`` for
OPT/Llama), so the same entry serves the classification and the causal-LM
heads of a family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from localio.errors import user_error


@dataclass(frozen=True)
class ArchitectureSpec:
    """The layout facts fedsite needs about one model family."""

    family: str
    model_types: tuple[str, ...]
    blocks_path: str  # ModuleList of transformer blocks, relative to base_model
    layer_count_key: str  # config attribute holding the block count
    lora_targets: tuple[str, ...]  # module names peft should wrap (attention projections)
    classifier_head: str  # attribute of the *ForSequenceClassification model
    final_norm_path: str | None  # relative to base_model; None when blocks are post-norm


_SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta"),
        blocks_path="encoder.layer",
        layer_count_key="num_hidden_layers",
        lora_targets=("query", "value"),
        classifier_head="classifier",
        final_norm_path=None,
    ),
    ArchitectureSpec(
        family="gpt2",
        model_types=("gpt2",),
        blocks_path="h",
        layer_count_key="n_layer",
        lora_targets=("c_attn",),
        classifier_head="score",
        final_norm_path="ln_f",
    ),
    ArchitectureSpec(
        family="opt",
        model_types=("opt",),
        blocks_path="decoder.layers",
        layer_count_key="num_hidden_layers",
        lora_targets=("q_proj", "v_proj"),
        classifier_head="score",
        final_norm_path="decoder.final_layer_norm",
    ),
    ArchitectureSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks_path="layers",
        layer_count_key="num_hidden_layers",
        lora_targets=("q_proj", "v_proj"),
        classifier_head="score",
        final_norm_path="norm",
    ),
)


@user_error
class UnsupportedArchitectureError(ValueError):
    """A model whose family fedsite does not know how to take apart."""


def supported_model_types() -> list[str]:
    return sorted(t for spec in _SPECS for t in spec.model_types)


def spec_for_config(config: PretrainedConfig) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    for spec in _SPECS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported: "
        + ", ".join(supported_model_types())
    )


def spec_for(model: PreTrainedModel) -> ArchitectureSpec:
    return spec_for_config(model.config)


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's ModuleList of transformer blocks, in order."""
    spec = spec_for(model)
    blocks = _resolve(model.base_model, spec.blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{spec.family}: expected a ModuleList at base_model.{spec.blocks_path}"
        )
    return blocks


def blocks_prefix(model: PreTrainedModel) -> str:
    """State-dict prefix of block i is ``f"{blocks_prefix(model)}.{i}."``."""
    spec = spec_for(model)
    return f"{model.base_model_prefix}.{spec.blocks_path}"


def num_blocks(config: PretrainedConfig) -> int:
    return int(getattr(config, spec_for_config(config).layer_count_key))


def set_num_blocks(config: PretrainedConfig, count: int) -> None:
    """Update the config's block count (and per-layer lists some configs keep)."""
    setattr(config, spec_for_config(config).layer_count_key, count)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != count:
        config.layer_types = layer_types[:count]
