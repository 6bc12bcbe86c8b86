"""Offsite mode's job package: the emulator goes out, the full model stays home.

The package's ``model/`` folder is the emulator (embeddings, adapter blocks,
the compressed middle, final norm and head) saved as a normal Hugging Face
model with its layout JSON; the trainable tensors are the adapter blocks'
parameters and the task head, named as in the emulator. The coordinator maps
them back onto the full model with :func:`emulator.offsite.plug_in`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.distill import DistillConfig, distill, read_text_corpus
from emulator.offsite import (
    EmulatorLayout,
    adapter_parameter_names,
    build_emulator,
    head_parameter_names,
    save_emulator,
)
from emulator.package import JobSpec, PackageError


def trainable_names(emulator: PreTrainedModel, layout: EmulatorLayout) -> list[str]:
    """Adapter-block parameters and the task head: what a client trains (buffers excluded)."""
    params = {name for name, _ in emulator.named_parameters()}
    names = adapter_parameter_names(emulator, layout, emulator=True) + head_parameter_names(emulator)
    return [n for n in names if n in params]


def build_offsite_emulator(full: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, offsite: dict[str, Any],
                           *, base_dir: Path, work_dir: Path, seed: int) -> tuple[PreTrainedModel, EmulatorLayout]:
    """Layer drop, then (if asked) distillation of the kept middle blocks on the owner's public text."""
    emulator, layout = build_emulator(
        full,
        adapter_layers=offsite.get("adapter_layers") or None,
        keep=offsite.get("keep") or None,
        keep_ratio=None if offsite.get("keep") else offsite.get("keep_ratio"),
    )
    steps = int(offsite.get("distill_steps") or 0)
    if steps > 0:
        source = offsite.get("distill_data") or ""
        if not source:
            raise PackageError("offsite.distill_steps > 0 needs offsite.distill_data (a public text file)")
        path = Path(source) if Path(source).is_absolute() else base_dir / source
        texts = read_text_corpus(path)
        distill(full, emulator, layout, tokenizer, texts, DistillConfig(steps=steps, seed=seed),
                checkpoint_dir=work_dir / "distill")
    return emulator, layout


def write_offsite_package(full: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: JobSpec, folder: Path,
                          *, base_dir: Path) -> EmulatorLayout:
    emulator, layout = build_offsite_emulator(full, tokenizer, spec.offsite, base_dir=base_dir,
                                              work_dir=folder.parent, seed=spec.seed)
    for param in emulator.parameters():
        param.requires_grad_(False)
    save_emulator(emulator, layout, folder / "model")
    tokenizer.save_pretrained(str(folder / "model"))
    params = dict(emulator.named_parameters())
    spec.trainable = {name: list(params[name].shape) for name in trainable_names(emulator, layout)}
    return layout


def prepare_offsite_trainable(emulator: PreTrainedModel, folder: Path, spec: JobSpec) -> torch.nn.Module:
    """Freeze the emulator but for the tensors the spec names (adapter blocks and head)."""
    params = dict(emulator.named_parameters())
    missing = sorted(set(spec.trainable) - set(params))
    if missing:
        raise PackageError(f"the emulator lacks trainable tensors the package declares, e.g. {missing[:2]}")
    for name, param in params.items():
        param.requires_grad_(name in spec.trainable)
    return emulator

