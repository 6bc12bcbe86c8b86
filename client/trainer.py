"""Local training: a few optimizer steps on a party's own examples.

The same function serves the edge client, the Flower ClientApp and the
benchmarks. Data order is drawn from a generator seeded by (job seed, round,
client index), so a simulated and a real run of the same job see the same
batches. When sample-level DP is on, the DataLoader and optimizer are handed
to Opacus (Poisson sampling) and the steps are recorded in the client's
privacy ledger.

A step is one *logical* batch (``batch_size`` examples, the batch the
optimizer and, under DP, the noise see), computed in *physical* chunks of at
most ``physical_batch_size`` rows so that memory stays bounded whatever the
logical batch. Under DP the chunks go through Opacus' skip-step protocol (the
one its ``BatchMemoryManager`` uses): every chunk's per-sample gradients are
clipped and summed, and the noise is added once per logical batch, so the
update does not depend on the chunking. The rows of a logical batch are
sorted by length before they are cut into chunks: each chunk is padded only
to its own longest row, which saves a third of the compute on short texts.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, RandomSampler

from emulator.architectures import UnsupportedArchitectureError, spec_for_config
from emulator.prefix import FrozenPrefix
from emulator.tasks import EncodedExamples


@dataclass(frozen=True)
class TrainSettings:
    """One round's local training, as the coordinator's instruction gives it."""
    local_steps: int
    batch_size: int  # logical batch: examples per optimizer step (the expected size under Poisson sampling)
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    head_lr: float = 0.0  # > 0: a separate learning rate for the (freshly initialised) task head
    physical_batch_size: int = 0  # rows computed at once; 0 = the whole logical batch, however large

    @property
    def chunk(self) -> int:
        """Rows computed at once: memory is bounded by this, not by the logical batch size."""
        return self.physical_batch_size if self.physical_batch_size > 0 else sys.maxsize


@dataclass
class TrainResult:
    """What the round's training reports: the mean loss (over batches whose loss was finite), steps, wall seconds."""
    loss: float
    steps: int
    seconds: float


# (model, optimizer, loader) -> private (model, optimizer, loader); the DP hook.
PrivatizeFn = Callable[
    [torch.nn.Module, torch.optim.Optimizer, DataLoader],
    tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader],
]


def data_generator(seed: int, round_id: int, data_seed: int) -> torch.Generator:
    """The round's batch order: from the job seed, the round and the client's data, never from a driver's
    client id, so the gRPC and Flower runs of a job draw the same batches.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + round_id * 10_007 + data_seed) % (2**63))


def is_head_parameter(model: torch.nn.Module, name: str) -> bool:
    """Parameters of the task head (classifier/score, also inside peft's modules_to_save)."""
    config = getattr(model, "config", None)
    try:
        head = spec_for_config(config).classifier_head if config is not None else None
    except UnsupportedArchitectureError:
        return False
    return head is not None and (name.startswith(head + ".") or f".{head}." in name)


def param_groups(model: torch.nn.Module, settings: TrainSettings) -> list[dict]:
    """The optimizer's groups: the task head gets its own learning rate when ``head_lr`` > 0 (it starts from random)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if settings.head_lr <= 0:
        return [{"params": [p for _, p in trainable], "lr": settings.lr}]
    head = [p for n, p in trainable if is_head_parameter(model, n)]
    body = [p for n, p in trainable if not is_head_parameter(model, n)]
    return [g for g in ({"params": body, "lr": settings.lr}, {"params": head, "lr": settings.head_lr}) if g["params"]]


def chunks_by_length(indices: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` sorted by row length (stable) and cut into chunks of at most ``size``.

    An empty batch gives one empty chunk: under DP it is still a (noise-only) step.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    if not ordered:
        return [[]]
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def _logical_batches(loader: DataLoader) -> Iterator[list[int]]:
    """Index lists of the loader's batch sampler (plain random batches or Opacus' Poisson batches), forever."""
    sampler = loader.batch_sampler
    assert sampler is not None
    while True:
        for batch in sampler:
            yield [int(i) for i in batch]


def train_steps(
    model: torch.nn.Module,
    data: EncodedExamples,
    settings: TrainSettings,
    *,
    generator: torch.Generator,
    privatize: PrivatizeFn | None = None,
    prefix: FrozenPrefix | None = None,
) -> TrainResult:
    """Run ``settings.local_steps`` AdamW steps over the trainable parameters of ``model``.

    With ``prefix`` (the frozen bottom of ``model`` computed once for ``data``), the steps run the
    model's top on the cached states: the same parameters, the same batches, less arithmetic.
    """
    start = time.monotonic()
    if prefix is not None:
        model = prefix.view
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(param_groups(model, settings),
                                                         weight_decay=settings.weight_decay)
    sampler = RandomSampler(data, replacement=False, generator=generator)
    loader = DataLoader(data, batch_size=min(settings.batch_size, len(data)), sampler=sampler,
                        collate_fn=data.collate, drop_last=False)
    model.train()  # before privatize: Opacus checks the mode and skips eval-mode forwards
    if privatize is not None:
        model, optimizer, loader = privatize(model, optimizer, loader)
    lengths = prefix.lengths() if prefix is not None else [len(ids) for ids in data.input_ids]
    private = isinstance(optimizer, DPOptimizer)
    total_loss, counted = 0.0, 0
    batches = _logical_batches(loader)
    for _ in range(settings.local_steps):
        logical = next(batches)
        optimizer.zero_grad(set_to_none=True)
        parts = chunks_by_length(logical, lengths, settings.chunk)
        for number, part in enumerate(parts):
            last = number == len(parts) - 1
            batch = prefix.collate(part) if prefix is not None else loader.collate_fn([data[i] for i in part])
            out: Any = model(**batch)
            loss = out.loss
            if private:
                # Opacus scales each chunk's per-sample gradients itself (loss_reduction="mean");
                # every chunk but the last only clips and accumulates, the last adds the noise and steps
                loss.backward()
                optimizer.signal_skip_step(do_skip=not last)  # type: ignore[attr-defined]
                optimizer.step()
                if not last:
                    optimizer.zero_grad(set_to_none=True)  # drops grad_sample, keeps the clipped sum
            else:
                # gradient accumulation: each chunk's mean loss weighted by its share of the logical batch
                (loss * (len(part) / max(len(logical), 1))).backward()
                if last:
                    optimizer.step()
            value = loss.item()
            if part and math.isfinite(value):
                total_loss += value * len(part)
                counted += len(part)
    model.eval()
    return TrainResult(loss=total_loss / max(counted, 1), steps=settings.local_steps,
                       seconds=time.monotonic() - start)
