"""Plug-in refinement: teach the plugged-in full model what the tuned emulator predicts, on public text.

The adapter comes back tuned *for the emulator*: its top block learnt the
emulator's middle output, which the full middle only approximates, so the
plug-in is worse than the emulator it was tuned on (experiments/offsite/RESULTS.md).
The coordinator owns public text (it distils the emulator on it) and both models,
so it can close that gap without any client data: the tuned emulator is the
teacher, the plugged-in full model the student, and the adapter blocks and head
of the student (the tensors the clients trained; everything else stays frozen)
learn to match the teacher's output distribution (KL at a temperature, the
usual knowledge distillation). Nothing of this goes back to the clients: they
keep training the emulator's adapter.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.adapter import adapter_parameter_names, head_parameter_names
from emulator.batching import collate, encode, pad_id_of, shuffled_batches
from emulator.layout import EmulatorLayout
from emulator.progress import StepProgress
from emulator.settings import OffsiteSettings

log = logging.getLogger("fedsite.refine")


@dataclass
class RefineConfig:
    """One refinement run; what the job file sets (``[offsite] refine_*``) defaults as it does there."""

    steps: int = 300
    batch_size: int = 32
    lr: float = OffsiteSettings.refine_lr
    temperature: float = OffsiteSettings.refine_temperature
    max_length: int = 64
    seed: int = 0
    max_grad_norm: float = 1.0


def _kl(student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    """KL(teacher || student) over the last dimension, averaged over rows (or unmasked tokens), times T^2."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    mean = per_row.mean() if mask is None else (per_row * mask).sum() / mask.sum().clamp(min=1)
    return mean * temperature**2


def refine_plug_in(
    plugged: PreTrainedModel,
    teacher: nn.Module,
    layout: EmulatorLayout,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: RefineConfig,
    *,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[PreTrainedModel, list[float]]:
    """A refined copy of ``plugged`` (the full model with the tuned adapter in) and the KL per step.

    ``teacher`` is the emulator with the same tuned adapter; it is not changed.
    """
    student = copy.deepcopy(plugged)
    names = set(adapter_parameter_names(student, layout, emulator=False)) | set(head_parameter_names(student))
    params = [p for n, p in student.named_parameters() if n in names]
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    data = encode(tokenizer, texts, config.max_length)
    pad_id = pad_id_of(tokenizer)
    causal_lm = student.get_output_embeddings() is not None and not head_parameter_names(student)
    teacher.eval()
    student.eval()  # no dropout: match a deterministic teacher
    bar = StepProgress("refining the plug-in", config.steps, enabled=progress, log=log, report=report)
    losses: list[float] = []
    for step, index in enumerate(shuffled_batches(len(data), config.batch_size, config.seed, config.steps)):
        for group in opt.param_groups:  # linear decay: a short run should end settled
            group["lr"] = config.lr * (1 - step / config.steps)
        batch = collate(data, index, pad_id)
        with torch.no_grad():
            target = teacher(**batch).logits
        out = student(**batch).logits
        mask = batch["attention_mask"].float() if causal_lm else None
        loss = _kl(out, target, mask, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        bar.step(kl=losses[-1])
    bar.close()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, losses
