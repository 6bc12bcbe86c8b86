"""LoRA packaging through peft: wrap, name the trainable tensors, merge, export.

The coordinator and every client build the trainable model the same way
(base folder + initial adapter folder from the job package), so the tensor
names on the wire are peft's own parameter names and match on both sides.
With ``freeze_a`` (FFA-LoRA) the A factors stay at their shared random
initialisation and only B (and the head) train: averaging B over clients then
equals averaging the products BA exactly, and DP noise lands on half the
parameters.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from emulator.architectures import blocks_prefix, num_blocks, spec_for
from emulator.pooling import trainable_block_indices
from emulator.settings import LoraSettings
from localio.errors import user_error


@user_error
class MergeError(ValueError):
    """A merge that would write non-finite weights."""


def lora_config_for(model: PreTrainedModel, settings: LoraSettings, *, task: str) -> LoraConfig:
    """peft's config for ``settings``. Bare target names (``query``) mean those modules inside the
    transformer blocks LoRA may wrap; dotted ones (``pooler.dense``) name one module wherever it is."""
    spec = spec_for(model)
    targets = list(settings.target_modules or spec.lora_targets)
    blocks = trainable_block_indices(model.config)  # never the frozen mean-pooling block
    if settings.top_blocks > 0:
        every = blocks if blocks is not None else list(range(num_blocks(model.config)))
        if settings.top_blocks > len(every):
            raise ValueError(f"lora.top_blocks = {settings.top_blocks} but the model has {len(every)} blocks")
        blocks = every[-settings.top_blocks:]
    target: list[str] | str = targets
    if blocks is not None or any("." in t for t in targets):
        target = _target_pattern(model, targets, blocks)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        modules_to_save=[spec.classifier_head] if task == "classification" else None,
        fan_in_fan_out=spec.family == "gpt2",  # GPT-2 keeps its projections as Conv1D
        bias="none",
    )


def _target_pattern(model: PreTrainedModel, targets: list[str], blocks: list[int] | None) -> str:
    """One regular expression (peft full-matches it against module names) for bare names inside the
    allowed blocks and dotted names anywhere."""
    bare = [re.escape(t) for t in targets if "." not in t]
    dotted = [re.escape(t) for t in targets if "." in t]
    alternatives = []
    if bare:
        indices = r"\d+" if blocks is None else "|".join(str(i) for i in blocks)
        alternatives.append(rf"(?:.*\.)?{re.escape(blocks_prefix(model))}\.(?:{indices})\.(?:.*\.)?(?:{'|'.join(bare)})")
    alternatives.extend(rf"(?:.*\.)?{name}" for name in dotted)
    return "|".join(f"(?:{a})" for a in alternatives)


def add_lora(model: PreTrainedModel, settings: LoraSettings, *, task: str, seed: int = 0) -> PeftModel:
    """Wrap ``model`` (in place) with freshly initialised LoRA factors; seeded for reproducibility."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config_for(model, settings, task=task))
    if settings.freeze_a:
        freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


def load_lora(base: PreTrainedModel, adapter_dir: Path, *, freeze_a: bool) -> PeftModel:
    """The trainable model a client (or the coordinator) rebuilds from a package."""
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    if freeze_a:
        freeze_lora_a(peft_model)
    return peft_model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached fp32 copies of every trainable parameter, by parameter name."""
    return {
        name: param.detach().to(torch.float32).clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def trainable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """The base model with LoRA folded in, built on a copy; refuses non-finite results."""
    clone = copy.deepcopy(model)
    for name, param in clone.named_parameters():
        if ("lora_" in name or "modules_to_save" in name) and not torch.isfinite(param).all():
            raise MergeError(f"refusing to merge: {name} has non-finite values")
    merged = clone.merge_and_unload(safe_merge=True)
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise MergeError(f"refusing to export: merged weight {name} is non-finite")
    return merged
