"""The coordinator's model in lora mode: the package's model with its LoRA factors, merged at export.

Clients train LoRA factors (and the task head) on their own copy of the base
model; this object holds the coordinator's copy of the same trainable model,
takes each round's aggregate into it, evaluates it on the validation split
and writes the final model both merged (what plain transformers loads) and
as a peft adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from emulator.lora import load_trainable_state, merged_copy, trainable_state
from emulator.package import load_trainable_model
from emulator.prefix import FrozenPrefix, compute_prefix, cut_index
from emulator.tasks import EncodedExamples, evaluate


class HasFolder(Protocol):
    """What this model needs of the job's package (:class:`coordinator.job.Package`): where it was unpacked."""

    folder: Path


class LoraGlobalModel:
    """The coordinator's copy of the trainable model (lora mode), rebuilt from the package."""

    def __init__(self, package: HasFolder, validation: EncodedExamples | None, tokenizer: PreTrainedTokenizerBase,
                 eval_batch_size: int = 64, cache_prefix: bool = False) -> None:
        self.model, _, self.spec = load_trainable_model(package.folder)
        self.validation = validation
        self.tokenizer = tokenizer
        self.eval_batch_size = eval_batch_size
        self.cache_prefix = cache_prefix
        self._validation_prefix: FrozenPrefix | None = None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA factors and head: what travels each round."""
        return trainable_state(self.model)

    def set_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the round's new trainable tensors in place (the frozen base is never touched)."""
        load_trainable_state(self.model, state)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current model; empty without a validation file."""
        if self.validation is None:
            return {}
        return evaluate(self.model, self.validation, batch_size=self.eval_batch_size, prefix=self._prefix())

    def _prefix(self) -> FrozenPrefix | None:
        """The validation examples' frozen-prefix states when only the model's top trains (computed once:
        rounds change only trainable tensors), so each round's evaluation runs just the top."""
        if not self.cache_prefix or self.validation is None:
            return None
        if self._validation_prefix is None:
            cut = cut_index(self.model)
            if cut is None or cut == 0:
                self.cache_prefix = False
                return None
            self._validation_prefix = compute_prefix(self.model, self.validation, cut)
        return self._validation_prefix

    def export(self, folder: Path) -> None:
        """final/: merged model + tokenizer that plain transformers loads; final/adapter/: peft adapter.

        Written beside ``folder`` and renamed into place; a failure (a full disk) leaves no partial folder.
        """
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            merged = merged_copy(self.model)  # type: ignore[arg-type]
            merged.save_pretrained(str(tmp), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            self.model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)  # type: ignore[operator]
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
