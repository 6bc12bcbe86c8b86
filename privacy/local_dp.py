"""Sample-level DP-SGD on one client: Opacus per-sample gradients, clipping, noise, Poisson
sampling, for Hugging Face / peft models that take dict batches.

What this adds on top of ``opacus.PrivacyEngine.make_private`` and why:

* **Per-sample loss for causal LMs.** Hugging Face averages the LM loss over *all tokens
  of the batch*; Opacus' ``loss_reduction="mean"`` multiplies by the batch size to
  recover per-sample gradients, which is only right when every sample has the same
  number of target tokens. With padding, sample i's "per-sample gradient" came out
  scaled by B·n_i/Σn_j — it depended on the other samples in the batch, so clipping no
  longer bounded one sample's influence. The wrapper recomputes the loss as the mean
  over samples of each sample's mean token loss; classification losses are already
  per-sample means and are left alone.
* **Empty Poisson batches.** Opacus' own collate wrapper learns the batch structure
  from the first non-empty batch (or, before that, returns a list of tensors, which a
  ``model(**batch)`` call cannot take). Here the empty batch is built from the structure
  of ``collate([dataset[0]])`` up front, and the wrapper does not run the model on it:
  it returns a zero loss and empty per-sample gradients, so ``optimizer.step()`` still
  adds noise (the accountant counts that step too). The loader is in :mod:`privacy.poisson`.
* **Grad samplers** for modules Opacus does not know: transformers' ``Conv1D`` (GPT-2)
  and the RMSNorms of the Llama family (registered on import of this module). Opacus
  would otherwise fall back to functorch, which also works but re-runs each layer, and
  fails on BERT's LM head (tied bias; a no-op sampler for the head fixes that). Also a
  batch-first patch for OPT's decoder layer and a guard against flattened batches (see
  below). The explicit samplers are checked against one backward pass per sample in
  tests/privacy/test_local_dp.py. They live in :mod:`privacy.dp_samplers`; group-wise clipping (the
  task head's share of the bound) in :mod:`privacy.group_clipping`.

The caller records the round in the ledger after training (``ledger.record``), so a
crashed round that released nothing is not charged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from privacy.accounting import (
    PrivacyBudgetExhausted,
    PrivacyLedger,
    check_budget,
    noise_multiplier_for,
)
from privacy.dp_errors import LocalDPError
from privacy.dp_samplers import patch_flattening_blocks
from privacy.group_clipping import GroupClippedDPOptimizer, split_clipping_bound
from privacy.poisson import PoissonDataLoader

__all__ = [
    "DPLossAdapter",
    "GroupClippedDPOptimizer",
    "LocalDPError",
    "PoissonDataLoader",
    "PrivacyBudgetExhausted",
    "check_budget",
    "make_private",
    "noise_multiplier_for",
    "per_sample_causal_lm_loss",
    "unwrap",
]


# ---------------------------------------------------------------------------------------
# The model wrapper: per-sample LM loss and empty batches.


def per_sample_causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean over samples of each sample's mean next-token loss.

    For one sample this equals Hugging Face's causal-LM loss; for a batch, sample i's
    gradient (times B, as Opacus scales it) is the gradient of its own loss alone.
    A sample with no target token contributes 0.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
    token_loss = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=ignore_index, reduction="none"
    )  # (B, T-1), 0 where ignored
    counts = (shift_labels != ignore_index).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).mean()


def _is_causal_lm(model: nn.Module) -> bool:
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    return type(inner).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _batch_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


@dataclass
class EmptyBatchOutput(ModelOutput):
    """What the wrapper returns for an empty Poisson batch: a zero loss, no logits."""

    loss: Tensor | None = None
    logits: Tensor | None = None


class DPLossAdapter(nn.Module):
    """Wraps a Hugging Face model for DP-SGD: per-sample LM loss and empty batches."""

    def __init__(self, model: nn.Module, *, causal_lm: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.causal_lm = _is_causal_lm(model) if causal_lm is None else causal_lm
        self.current_batch_size: int | None = None  # set during forward, for the guard

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch_size = _batch_size(args, kwargs)
        if batch_size == 0:
            return self._empty_batch()
        self.current_batch_size = batch_size
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.current_batch_size = None

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if not self.causal_lm or labels is None:
            return self.model(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        out = self.model(*args, **kwargs)
        loss = per_sample_causal_lm_loss(out.logits, labels)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    def _empty_batch(self) -> EmptyBatchOutput:
        # No forward ran, so no hook produced per-sample gradients: give every trainable
        # parameter an empty (0, *shape) one. DPOptimizer then clips nothing and still
        # adds N(0, σ²C²) — an empty Poisson batch is a real, noised step.
        for p in self.parameters():
            if p.requires_grad and self.training and torch.is_grad_enabled():
                p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                    (0, *p.shape), dtype=p.dtype, device=p.device
                )
        anchor = next((p for p in self.parameters() if p.requires_grad), None)
        device = anchor.device if anchor is not None else None
        loss = torch.zeros((), device=device, requires_grad=True)
        return EmptyBatchOutput(loss=loss, logits=None)


@dataclass
class _Attachment:
    """Everything make_private hung on a plain model, so it can all be taken off again."""

    gsm: GradSampleModule
    guard_handles: list[torch.utils.hooks.RemovableHandle]
    patched: list[nn.Module]

    def detach(self) -> None:
        for handle in self.guard_handles:
            handle.remove()
        self.guard_handles.clear()
        for module in self.patched:
            if "forward" in vars(module):
                del module.forward
        self.patched.clear()
        self.gsm._close()  # Opacus hooks and per-parameter attributes


# Kept in the plain model's __dict__ (not a submodule, not in the state dict), so that a
# model dropped without unwrap() is garbage-collected together with its hooks.
_ATTACHMENT_ATTR = "_fedsite_dp_attachment"


def _plain(module: nn.Module) -> nn.Module:
    while True:
        if isinstance(module, GradSampleModule):
            module = module._module
        elif isinstance(module, DPLossAdapter):
            module = module.model
        else:
            return module


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model behind Opacus' wrapper, with every DP hook and patch removed.

    Call it when the round's training is done (e.g. before reading the state dict or
    evaluating); the DP wrapper stops computing per-sample gradients afterwards.
    Calling it on a plain model is a no-op.
    """
    plain = _plain(module)
    attachment = vars(plain).pop(_ATTACHMENT_ATTR, None)
    if isinstance(attachment, _Attachment):
        attachment.detach()
    return plain


def _install_batch_guard(adapter: DPLossAdapter) -> list[torch.utils.hooks.RemovableHandle]:
    """Refuse a forward in which a trainable layer sees a batch dimension other than the
    model's: Opacus would silently compute per-token (or otherwise wrong) "per-sample"
    gradients for it. Checks modules that own trainable parameters, as Opacus hooks."""
    handles = []
    for name, module in adapter.model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue

        def check(mod: nn.Module, inputs: tuple[Any, ...], _name: str = name) -> None:
            expected = adapter.current_batch_size
            if expected is None or not mod.training or not torch.is_grad_enabled():
                return
            first = next((x for x in inputs if isinstance(x, Tensor)), None)
            if first is not None and first.dim() >= 1 and first.shape[0] != expected:
                raise LocalDPError(
                    f"layer {_name!r} sees {first.shape[0]} rows for a batch of {expected}: "
                    "the model flattens the batch, so per-sample gradients would be wrong; "
                    "freeze this layer or add a batch-first patch in privacy/local_dp.py"
                )

        handles.append(module.register_forward_pre_hook(check))
    return handles


# ---------------------------------------------------------------------------------------
# Public entry points.


def _generator(seed: int | None) -> torch.Generator:
    # Opacus' secure_mode needs torchcsprng (not installed): without a seed, seed the
    # PRNG from OS entropy so that the noise is at least unpredictable to others.
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def make_private(
    module: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: PrivacyLedger,
    seed: int | None = None,
    clip_groups: tuple[Sequence[nn.Parameter], float] | None = None,
) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
    """Turn a model, its optimizer and a data loader into their DP-SGD versions.

    * model: ``GradSampleModule(DPLossAdapter(module))`` — call it as before
      (``model(**batch).loss.backward()``); ``unwrap`` gives the plain model back.
    * optimizer: an Opacus DPOptimizer (clip each sample to ``max_grad_norm``, add
      N(0, (σC)²) to the sum, divide by the expected batch size).
    * data loader: Poisson sampling at ``q = batch_size / len(dataset)`` (the expected
      batch size is the original ``batch_size``); its ``sample_rate`` is what
      ``ledger.record`` needs after the round.

    Only parameters with ``requires_grad`` must be in ``optimizer``; the model must be in
    train mode while stepping (Opacus' hooks skip eval-mode forwards). ``ledger`` is not
    written here: record the round's steps after training.

    ``clip_groups = (params, fraction)`` clips those parameters' part of each sample's
    gradient to ``sqrt(fraction) * max_grad_norm`` and the rest to ``sqrt(1 - fraction) *
    max_grad_norm`` (:class:`GroupClippedDPOptimizer`): the same sensitivity, the budget
    shared on purpose.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise LocalDPError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise LocalDPError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not isinstance(ledger, PrivacyLedger):
        raise LocalDPError("ledger must be a privacy.accounting.PrivacyLedger")
    if isinstance(module, GradSampleModule | DPLossAdapter):
        raise LocalDPError("module is already wrapped for DP-SGD; pass the plain model")
    if data_loader.batch_size is None:
        raise LocalDPError("data_loader needs a batch_size (custom batch samplers are not supported)")
    dataset = data_loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise LocalDPError("cannot run DP-SGD on an empty dataset")
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise LocalDPError("the model has no trainable parameters")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not in_optimizer <= {id(p) for p in trainable}:
        raise LocalDPError("the optimizer holds parameters that do not require grad")

    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise LocalDPError(f"model is not DP-SGD compatible: {errors[0]}")

    sample_rate = min(1.0, data_loader.batch_size / n)
    generator = _generator(seed)
    unwrap(module)  # a model made private before (last round) loses its old hooks first
    patched = patch_flattening_blocks(module)
    adapter = DPLossAdapter(module)
    model = GradSampleModule(adapter, batch_first=True, loss_reduction="mean", strict=True)
    vars(module)[_ATTACHMENT_ATTR] = _Attachment(model, _install_batch_guard(adapter), patched)
    common: dict[str, Any] = {"noise_multiplier": noise_multiplier, "loss_reduction": "mean", "generator": generator,
                              "expected_batch_size": max(1, round(n * sample_rate))}
    dp_optimizer: DPOptimizer
    if clip_groups is None:
        dp_optimizer = DPOptimizer(optimizer, max_grad_norm=max_grad_norm, **common)
    else:
        grouped, fraction = clip_groups
        if not 0.0 < fraction < 1.0:
            raise LocalDPError(f"the clipping fraction of a parameter group must be in (0, 1), got {fraction}")
        first = {id(p) for p in grouped}
        if not first or not first < in_optimizer:
            raise LocalDPError("a clipping group must be a non-empty proper subset of the trained parameters")
        group_of = {id(p): 0 if id(p) in first else 1 for group in optimizer.param_groups for p in group["params"]}
        dp_optimizer = GroupClippedDPOptimizer(optimizer, group_of=group_of,
                                               bounds=split_clipping_bound(max_grad_norm, fraction), **common)
    loader = PoissonDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=data_loader.collate_fn,
        generator=generator,
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
    )
    return model, dp_optimizer, loader
