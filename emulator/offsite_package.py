"""Offsite mode's job package: the emulator goes out, the full model stays home.

The package's ``model/`` folder is the emulator (embeddings, adapter blocks,
the compressed middle, final norm and head) saved as a normal Hugging Face
model with its layout JSON; the trainable tensors are the adapter blocks'
parameters and the task head, named as in the emulator. The coordinator maps
them back onto the full model with :func:`emulator.adapter.plug_in`.

With ``[offsite] adapter_lora`` the clients train LoRA factors on the adapter
blocks instead (the ``[lora]`` table's r, alpha, dropout, targets and
freeze_a), saved as a peft adapter in ``adapter/`` as in lora mode; rounds
carry the factors and the head, and :func:`adapter_state_for_plug_in` folds
them into the blocks before plug-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.adapter import adapter_lora_config, adapter_parameter_names, head_parameter_names
from emulator.distill import DistillConfig, distill
from emulator.job_spec import JobSpec, PackageError
from emulator.layout import EmulatorLayout
from emulator.lora import freeze_lora_a, load_lora, merged_copy, trainable_state
from emulator.offsite import build_emulator, save_emulator
from emulator.public_text import read_public_text
from emulator.settings import OffsiteSettings

ADAPTER_DIR = "adapter"  # the peft adapter (adapter_lora only), as in lora mode's package


def trainable_names(emulator: PreTrainedModel, layout: EmulatorLayout) -> list[str]:
    """Adapter-block parameters and the task head: what a client trains (buffers excluded)."""
    params = {name for name, _ in emulator.named_parameters()}
    names = adapter_parameter_names(emulator, layout, emulator=True) + head_parameter_names(emulator)
    return [n for n in names if n in params]


def build_offsite_emulator(full: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, offsite: OffsiteSettings,
                           *, base_dir: Path, work_dir: Path, seed: int, max_length: int = 64,
                           report: Callable[[str], None] | None = None) -> tuple[PreTrainedModel, EmulatorLayout]:
    """Layer drop, then (if asked) distillation of the kept middle blocks on the owner's public text.

    ``report`` gets a one-line status after every distillation step.
    """
    emulator, layout = build_emulator(full, **offsite.layer_drop())
    if offsite.distill_steps > 0:
        if not offsite.distill_data:
            raise PackageError("offsite.distill_steps > 0 needs offsite.distill_data (a public text file)")
        texts = read_public_text(offsite.distill_data, base_dir)  # a file, or "bbcnews" (emulator/public_text.py)
        config = DistillConfig(steps=offsite.distill_steps, seed=seed, lr=offsite.distill_lr,
                               batch_size=offsite.distill_batch_size, max_length=max_length,
                               input_noise=offsite.distill_input_noise,
                               hidden_metric=offsite.distill_hidden_metric, kl_weight=offsite.distill_kl_weight)
        distill(full, emulator, layout, tokenizer, texts, config, checkpoint_dir=work_dir / "distill", report=report)
    return emulator, layout


def write_offsite_package(full: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: JobSpec, folder: Path,
                          *, base_dir: Path, report: Callable[[str], None] | None = None) -> EmulatorLayout:
    emulator, layout = build_offsite_emulator(full, tokenizer, spec.offsite, base_dir=base_dir,
                                              work_dir=folder.parent, seed=spec.seed, max_length=spec.max_length,
                                              report=report)
    for param in emulator.parameters():
        param.requires_grad_(False)
    save_emulator(emulator, layout, folder / "model")
    tokenizer.save_pretrained(str(folder / "model"))
    if spec.offsite.adapter_lora:
        wrapped = add_adapter_lora(emulator, layout, spec)
        wrapped.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True)
        spec.trainable = {name: list(t.shape) for name, t in trainable_state(wrapped).items()}
        return layout
    params = dict(emulator.named_parameters())
    spec.trainable = {name: list(params[name].shape) for name in trainable_names(emulator, layout)}
    return layout


def add_adapter_lora(emulator: PreTrainedModel, layout: EmulatorLayout, spec: JobSpec) -> PeftModel:
    """Fresh LoRA factors (seeded) on the adapter blocks, the head trained fully beside them."""
    lora = spec.lora
    torch.manual_seed(spec.seed)
    config = adapter_lora_config(
        emulator, layout, r=lora.r, alpha=lora.alpha, target_modules=list(lora.target_modules) or None,
        dropout=lora.dropout, train_head=spec.task == "classification",
    )
    wrapped = get_peft_model(emulator, config)
    if lora.freeze_a:
        freeze_lora_a(wrapped)
    return wrapped


def adapter_state_for_plug_in(model: torch.nn.Module, layout: EmulatorLayout) -> dict[str, torch.Tensor]:
    """The emulator-named adapter blocks and head to plug in, from a trained (maybe LoRA-wrapped) emulator.

    LoRA is folded into a copy (the trained model is left as it is; non-finite factors are refused).
    """
    emulator = merged_copy(model) if isinstance(model, PeftModel) else model
    assert isinstance(emulator, PreTrainedModel)
    state = emulator.state_dict()
    return {name: state[name].detach().clone() for name in trainable_names(emulator, layout)}


def prepare_offsite_trainable(emulator: PreTrainedModel, folder: Path, spec: JobSpec) -> torch.nn.Module:
    """Freeze the emulator but for the tensors the spec names (adapter blocks and head, or LoRA on them)."""
    if spec.offsite.adapter_lora:
        return load_lora(emulator, folder / ADAPTER_DIR, freeze_a=spec.lora.freeze_a)
    params = dict(emulator.named_parameters())
    missing = sorted(set(spec.trainable) - set(params))
    if missing:
        raise PackageError(f"the emulator lacks trainable tensors the package declares, e.g. {missing[:2]}")
    for name, param in params.items():
        param.requires_grad_(name in spec.trainable)
    return emulator

