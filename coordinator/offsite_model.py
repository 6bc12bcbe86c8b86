"""The coordinator's model in offsite mode: the full model, with the adapter plugged in.

Clients train adapter blocks and the head on the emulator; the global
trainable state is kept in the emulator's names (what travels), and every
update of it is plugged into a copy of the full model for evaluation and
export. The full model's middle blocks never leave this object. The export
also writes the tuned emulator (``final/emulator/``): every client can build
it from what it holds, and it is the "emulator alone" that the plug-in must
beat for offsite-tuning to protect anything.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.config import JobConfig
from emulator.adapter import plug_in
from emulator.layout import EmulatorError, EmulatorLayout
from emulator.lora import MergeError, load_trainable_state, merged_copy, trainable_state
from emulator.models import load_model, resolve_model_path
from emulator.offsite import save_emulator
from emulator.offsite_package import adapter_state_for_plug_in
from emulator.package import load_trainable_model
from emulator.public_text import read_public_text
from emulator.refine import RefineConfig, generate_texts, refine_plug_in, refinement_teacher
from emulator.tasks import EncodedExamples, evaluate

log = logging.getLogger("fedsite.offsite")
REFINEMENT_FILE = "refinement.json"
EMULATOR_DIR = "emulator"  # final/emulator/: the tuned emulator, with its offsite_layout.json


def refinement_helps(summary: dict[str, Any]) -> bool:
    """Whether the refined plug-in scored better than the plain one on the job's validation data (True when there
    is none to judge by). Refinement distils a teacher into the plug-in; on SmolLM2 the same settings that won 10 %
    on one draw of the data lost 2 % on another (experiments/offsite/RESULTS.md), so the export checks.
    Classification is judged by accuracy (ties by loss), a causal LM by its validation loss (its perplexity)."""
    before, after = summary.get("validation_plug_in"), summary.get("validation_refined")
    if not before or not after:
        return True
    if "val_accuracy" in before:
        return (after["val_accuracy"], -after["val_loss"]) > (before["val_accuracy"], -before["val_loss"])
    return bool(after["val_loss"] < before["val_loss"])


class OffsiteGlobalModel:
    """The coordinator's model in offsite mode (see the module): the full model stays here, only the
    adapter's state is exchanged.
    """
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
        offsite = config.offsite
        self.refine = RefineConfig(steps=offsite.refine_steps, lr=offsite.refine_lr,
                                   temperature=offsite.refine_temperature, max_length=config.model.max_length,
                                   seed=config.job.seed, emulator_weight=offsite.refine_emulator_weight,
                                   text=offsite.refine_text, generated_texts=offsite.refine_generated_texts)
        self.refine_keep = offsite.refine_keep  # "better": final/ holds the refined plug-in only if it scores better
        self.public_text = offsite.distill_data or None  # a file (relative to the job file) or "bbcnews"
        self.base_dir = config.base_dir

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter blocks and head (or LoRA on them), in the emulator's names."""
        return {name: t.clone() for name, t in self.state.items()}

    def set_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Plug the new state into the full model; a state that cannot be plugged in changes nothing."""
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
        """Validation metrics of the full model with the adapter plugged in: what the job delivers."""
        if self.validation is None:
            return {}
        return evaluate(self.plugged, self.validation, batch_size=self.eval_batch_size)

    def refined(self) -> tuple[PreTrainedModel, dict[str, Any]]:
        """The plug-in refined against the tuned emulator (or its mixture with the plug-in), on the public text or
        on texts that teacher writes (``[offsite] refine_*``)."""
        emulator = self.trainable
        load_trainable_state(emulator, self.state)  # the emulator with the final adapter: what clients tuned
        teacher = refinement_teacher(self.plugged, emulator, self.refine)
        if self.refine.text == "generated":
            log.info("refinement: the teacher writes %d texts", self.refine.generated_texts)
            texts = generate_texts(teacher, self.tokenizer, self.refine)
        else:
            assert self.public_text is not None  # the config requires distill_data for public refinement text
            texts = read_public_text(self.public_text, self.base_dir)
        log.info("refining the plug-in: %d steps on %d %s texts", self.refine.steps, len(texts), self.refine.text)
        model, kl = refine_plug_in(self.plugged, teacher, self.layout, self.tokenizer, texts, self.refine)
        summary: dict[str, Any] = {"steps": self.refine.steps, "lr": self.refine.lr,
                                   "temperature": self.refine.temperature, "text": self.refine.text,
                                   "emulator_weight": self.refine.emulator_weight, "kl_first": kl[0],
                                   "kl_last": sum(kl[-10:]) / len(kl[-10:])}
        if self.validation is not None:
            summary["validation_plug_in"] = self.evaluate()
            summary["validation_refined"] = evaluate(model, self.validation, batch_size=self.eval_batch_size)
            log.info("plug-in refinement: validation %s -> %s", summary["validation_plug_in"],
                     summary["validation_refined"])
        return model, summary

    def tuned_emulator(self) -> PreTrainedModel:
        """The emulator the clients trained, with the final adapter (LoRA folded in): the "emulator alone"."""
        load_trainable_state(self.trainable, self.state)
        if isinstance(self.trainable, PeftModel):
            return merged_copy(self.trainable)
        assert isinstance(self.trainable, PreTrainedModel)
        return self.trainable

    def export(self, folder: Path) -> None:
        """final/: the full model with the tuned adapter plugged in (refined, if the job asks and ``refine_keep``
        allows: see :func:`refinement_helps`);
        final/emulator/: the tuned emulator (the clients hold it anyway). Plain transformers loads both."""
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.plugged
        if self.refine.steps > 0:
            refined, summary = self.refined()
            summary["keep"] = self.refine_keep
            summary["kept"] = self.refine_keep == "always" or refinement_helps(summary)
            log.info("plug-in refinement: final/ holds the %s plug-in", "refined" if summary["kept"] else "plain")
            if summary["kept"]:
                model = refined
            tmp.mkdir(parents=True)
            (tmp / REFINEMENT_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        save_emulator(self.tuned_emulator(), self.layout, tmp / EMULATOR_DIR)
        self.tokenizer.save_pretrained(str(tmp / EMULATOR_DIR))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
