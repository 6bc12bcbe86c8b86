"""Group-wise clipping: a DP-SGD optimizer whose per-sample clipping bound is split between parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.optim import Optimizer

# ---------------------------------------------------------------------------------------
# Group-wise clipping.


class GroupClippedDPOptimizer(DPOptimizer):
    """DP-SGD whose per-sample clipping bound is split between groups of parameters.

    Each sample's gradient restricted to group g is clipped to ``bounds[g]`` on its own, so
    its whole clipped gradient has norm at most ``sqrt(sum(bounds²))``, which is the
    ``max_grad_norm`` the noise is calibrated to: the privacy guarantee is that of flat
    clipping at that bound. What changes is who gets the budget. With one flat clip, a
    group whose gradients are an order of magnitude larger (a freshly initialised task
    head, next to LoRA factors that start at zero) takes almost all of every sample's norm,
    and the other group's update is left below the noise.
    """

    def __init__(self, optimizer: Optimizer, *, group_of: dict[int, int], bounds: Sequence[float],
                 **kwargs: Any) -> None:
        super().__init__(optimizer, max_grad_norm=math.sqrt(sum(b * b for b in bounds)), **kwargs)
        self.group_of = group_of  # id(parameter) -> index into bounds
        self.bounds = [float(b) for b in bounds]

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        rows = len(samples[0]) if samples else 0
        squared = torch.zeros((len(self.bounds), rows), device=samples[0].device if samples else None)
        for p, g in zip(params, samples, strict=True):
            if rows:
                squared[self.group_of[id(p)]] += g.reshape(rows, -1).pow(2).sum(dim=1)
        bounds = torch.tensor(self.bounds, device=squared.device).unsqueeze(1)
        factors = (bounds / (squared.sqrt() + 1e-6)).clamp(max=1.0)  # (groups, rows)
        for p, g in zip(params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            g = g.to(p.dtype)
            grad = torch.einsum("i,i...", factors[self.group_of[id(p)]].to(p.dtype), g)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


def split_clipping_bound(max_grad_norm: float, fraction: float) -> tuple[float, float]:
    """(bound of the group given ``fraction`` of the squared bound, bound of the rest)."""
    return max_grad_norm * math.sqrt(fraction), max_grad_norm * math.sqrt(1.0 - fraction)
