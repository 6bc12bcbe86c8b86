"""Poisson sampling for DP-SGD: each example joins each batch independently, and an empty batch keeps the
structure of a full one (a dict of tensors with no rows), so the model wrapper can skip it and still add noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from privacy.dp_errors import LocalDPError

# ---------------------------------------------------------------------------------------
# Poisson-sampled data loader whose empty batch has the right structure.


def _empty_like_batch(template: Any) -> Any:
    if isinstance(template, Tensor):
        return template.new_empty((0, *template.shape[1:]))
    if isinstance(template, Mapping):
        return {k: _empty_like_batch(v) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return type(template)(_empty_like_batch(v) for v in template)
    raise LocalDPError(
        f"cannot build an empty Poisson batch containing {type(template).__name__}; "
        "collate to tensors, dicts, lists or tuples"
    )


class _EmptySafeCollate:
    """Collate that maps an empty sample list to an empty batch of the right structure."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset[Any]) -> None:
        self.collate_fn = collate_fn
        # Only shapes beyond the batch dimension and dtypes are kept: no data.
        self.empty = _empty_like_batch(collate_fn([dataset[0]]))

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 0:
            return _empty_like_batch(self.empty)
        return self.collate_fn(samples)


class PoissonDataLoader(DataLoader[Any]):
    """Each example joins each batch independently with probability ``sample_rate``."""

    sample_rate: float

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        sample_rate: float,
        collate_fn: Callable[[list[Any]], Any] | None,
        generator: torch.Generator,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=sample_rate, generator=generator
        )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(collate_fn or default_collate, dataset),
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.sample_rate = sample_rate
