"""The coordinator's model in offsite mode: the full model, with the adapter plugged in.

Clients train adapter blocks and the head on the emulator; the global
trainable state is kept in the emulator's names (what travels), and every
update of it is plugged into a copy of the full model for evaluation and
export. The full model's middle blocks never leave this object.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.config import JobConfig
from emulator.lora import MergeError, load_trainable_state, trainable_state
from emulator.models import load_model, resolve_model_path
from emulator.offsite import EmulatorError, EmulatorLayout, plug_in
from emulator.offsite_package import adapter_state_for_plug_in
from emulator.package import load_trainable_model
from emulator.tasks import EncodedExamples, evaluate


class OffsiteGlobalModel:
    def __init__(self, config: JobConfig, package: Any, validation: EncodedExamples | None,
                 tokenizer: PreTrainedTokenizerBase, eval_batch_size: int = 64) -> None:
        model_dir = resolve_model_path(config.model.path, config.base_dir)
        # the same seed as the package build: the full model's head starts where the emulator's does
        self.full: PreTrainedModel = load_model(model_dir, config.model.task, package.spec.labels,
                                                seed=config.job.seed)
        self.layout = EmulatorLayout.load(package.folder / "model")
        # what clients train: the emulator's adapter blocks + head, or LoRA factors on them + head
        self.trainable, _, _ = load_trainable_model(package.folder)
        self.state: dict[str, torch.Tensor] = trainable_state(self.trainable)
        self.plugged: PreTrainedModel = self._plug(self.state)
        self.validation = validation
        self.tokenizer = tokenizer
        self.eval_batch_size = eval_batch_size

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.state.items()}

    def set_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise KeyError("offsite state names differ from the package's trainable tensors")
        self.plugged = self._plug(state)  # refuses non-finite values, and then nothing has changed
        self.state = {name: t.clone() for name, t in state.items()}

    def _plug(self, state: dict[str, torch.Tensor]) -> PreTrainedModel:
        """The full model with ``state`` (adapter blocks + head, or LoRA on them + head) plugged in."""
        if not isinstance(self.trainable, PeftModel):
            return plug_in(self.full, state, self.layout)
        load_trainable_state(self.trainable, state)
        try:
            return plug_in(self.full, adapter_state_for_plug_in(self.trainable, self.layout), self.layout)
        except (MergeError, EmulatorError):
            load_trainable_state(self.trainable, self.state)  # back to the last good state
            raise

    def evaluate(self) -> dict[str, float]:
        if self.validation is None:
            return {}
        return evaluate(self.plugged, self.validation, batch_size=self.eval_batch_size)

    def export(self, folder: Path) -> None:
        """final/: the full model with the tuned adapter plugged in; plain transformers loads it."""
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        self.plugged.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
