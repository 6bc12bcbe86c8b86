"""Local training: a few optimizer steps on a party's own examples.

The same function serves the edge client, the Flower ClientApp and the
benchmarks. Data order is drawn from a generator seeded by (job seed, round,
client index), so a simulated and a real run of the same job see the same
batches. When sample-level DP is on, the DataLoader and optimizer are handed
to Opacus (Poisson sampling) and the steps are recorded in the client's
privacy ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler

from emulator.tasks import EncodedExamples


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    head_lr: float = 0.0  # > 0: a separate learning rate for the (freshly initialised) task head


@dataclass
class TrainResult:
    loss: float
    steps: int
    seconds: float
    examples_seen: int


# (model, optimizer, loader) -> private (model, optimizer, loader); the DP hook.
PrivatizeFn = Callable[
    [torch.nn.Module, torch.optim.Optimizer, DataLoader],
    tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader],
]


def data_generator(seed: int, round_id: int, data_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + round_id * 10_007 + data_seed) % (2**63))


def is_head_parameter(model: torch.nn.Module, name: str) -> bool:
    """Parameters of the task head (classifier/score, also inside peft's modules_to_save)."""
    from emulator.architectures import UnsupportedArchitectureError, spec_for_config

    config = getattr(model, "config", None)
    try:
        head = spec_for_config(config).classifier_head if config is not None else None
    except UnsupportedArchitectureError:
        return False
    return head is not None and (name.startswith(head + ".") or f".{head}." in name)


def param_groups(model: torch.nn.Module, settings: TrainSettings) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if settings.head_lr <= 0:
        return [{"params": [p for _, p in trainable], "lr": settings.lr}]
    head = [p for n, p in trainable if is_head_parameter(model, n)]
    body = [p for n, p in trainable if not is_head_parameter(model, n)]
    return [g for g in ({"params": body, "lr": settings.lr}, {"params": head, "lr": settings.head_lr}) if g["params"]]


def _forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def train_steps(
    model: torch.nn.Module,
    data: EncodedExamples,
    settings: TrainSettings,
    *,
    generator: torch.Generator,
    privatize: PrivatizeFn | None = None,
) -> TrainResult:
    """Run ``settings.local_steps`` AdamW steps over the trainable parameters of ``model``."""
    start = time.monotonic()
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(param_groups(model, settings),
                                                         weight_decay=settings.weight_decay)
    sampler = RandomSampler(data, replacement=False, generator=generator)
    loader = DataLoader(data, batch_size=min(settings.batch_size, len(data)), sampler=sampler,
                        collate_fn=data.collate, drop_last=False)
    model.train()  # before privatize: Opacus checks the mode and skips eval-mode forwards
    if privatize is not None:
        model, optimizer, loader = privatize(model, optimizer, loader)
    total_loss, counted, seen = 0.0, 0, 0
    batches = _forever(loader)
    for _ in range(settings.local_steps):
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        n = int(batch["input_ids"].shape[0])
        if n == 0:  # Poisson sampling can draw an empty batch: it still counts as a step
            optimizer.step()
            continue
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        value = loss.item()
        if math.isfinite(value):
            total_loss += value * n
            counted += n
        seen += n
    model.eval()
    return TrainResult(loss=total_loss / max(counted, 1), steps=settings.local_steps,
                       seconds=time.monotonic() - start, examples_seen=seen)
