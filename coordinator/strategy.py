"""Turning client updates into a new global state.

Clients send deltas (new - old) of the trainable tensors. ``weighted_mean``
is FedAvg's average weighted by examples; the server optimizer then applies
it: FedAvg adds it (times a server learning rate), FedAdam (Reddi et al.
2021) treats its negation as a gradient for Adam on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


class UpdateRejected(ValueError):
    """One client's update that cannot enter the aggregate (wrong names, shapes or values)."""


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> float:
    """Names, shapes, dtype and finiteness, checked before an update is used; returns the update's L2 norm.

    Finiteness follows from the norm (summed in float64, which no finite float32 update can overflow): a NaN or
    infinite norm means a non-finite value, and only then are the tensors searched for the one to name.
    """
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, ref in expected.items():
        value = update[name]
        if value.dtype != torch.float32:
            raise UpdateRejected(f"{name}: dtype {value.dtype}, expected float32")
        if tuple(value.shape) != tuple(ref.shape):
            raise UpdateRejected(f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        culprit = next((name for name in sorted(update) if not torch.isfinite(update[name]).all()), "?")
        raise UpdateRejected(f"{culprit}: non-finite values")
    return norm


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update (all tensors as one vector), summed in float64 so it cannot overflow.

    NaN or infinite exactly when some value is: the squares of float32 values stay far below float64's range.
    """
    return math.sqrt(sum(float(t.detach().to(torch.float64).square().sum()) for t in update.values()))


def weighted_mean(updates: Sequence[State], weights: Sequence[float]) -> State:
    """The weighted mean of updates (FedAvg's aggregate), computed in place into one accumulator so the
    server holds one update's worth of extra memory, not one per client.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"weights must sum to a positive number, got {total}")
    mean: State = {name: torch.zeros_like(t) for name, t in updates[0].items()}
    for update, weight in zip(updates, weights, strict=True):
        for name, value in update.items():
            mean[name].add_(value, alpha=weight / total)
    return mean


AGGREGATORS = ("mean", "median", "trimmed_mean")


def robust_mean(updates: Sequence[State], aggregator: str, trim_fraction: float = 0.1) -> State:
    """Coordinate-wise median or trimmed mean (Flower's implementations), unweighted.

    They need each client's plain update, so they exist only with secure
    aggregation off; they bound what a few faulty or hostile clients can do.
    """
    from flwr.server.strategy.aggregate import (  # noqa: PLC0415 - Flower (heavy) only for robust aggregators
        aggregate_median,
        aggregate_trimmed_avg,
    )

    names = sorted(updates[0])
    results = [([u[n].numpy() for n in names], 1) for u in updates]
    if aggregator == "median":
        arrays = aggregate_median(results)
    elif aggregator == "trimmed_mean":
        arrays = aggregate_trimmed_avg(results, trim_fraction)
    else:
        raise ValueError(f"unknown aggregator {aggregator!r}")
    return {n: torch.from_numpy(a.astype("float32")) for n, a in zip(names, arrays, strict=True)}


class ServerOptimizer:
    """Applies the aggregated delta to the global state; its state is checkpointed."""

    def step(self, global_state: State, delta: State) -> State:
        """The new global state after applying ``delta`` (the round's aggregate) to ``global_state``."""
        raise NotImplementedError

    def state_dict(self) -> State:
        """What a checkpoint must keep for the optimizer to continue after ``--resume``."""
        return {}

    def load_state_dict(self, state: State) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        del state


class FedAvg(ServerOptimizer):
    """Plain FedAvg (server ``lr`` 1.0: the global state moves by the mean delta); nothing to checkpoint."""
    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, global_state: State, delta: State) -> State:
        """``global + lr × delta``."""
        return {name: value + self.lr * delta[name] for name, value in global_state.items()}


class FedAdam(ServerOptimizer):
    """Adam on the server with pseudo-gradient -delta (adaptivity eps as in Reddi et al.)."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: State = {}
        self.v: State = {}

    def step(self, global_state: State, delta: State) -> State:
        """One Adam step with the aggregate as the (negated) pseudo-gradient; moments kept per tensor name."""
        new_state: State = {}
        for name, value in global_state.items():
            m = self.m.get(name, torch.zeros_like(value))
            v = self.v.get(name, torch.zeros_like(value))
            d = delta[name]
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self.beta2 * v + (1 - self.beta2) * d * d
            self.m[name], self.v[name] = m, v
            new_state[name] = value + self.lr * m / (v.sqrt() + self.eps)
        return new_state

    def state_dict(self) -> State:
        """Both moments, prefixed ``m/`` and ``v/``, so a resumed job continues the same Adam."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: State) -> None:
        """The moments from a checkpoint's :meth:`state_dict`."""
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v/")}


OPTIMIZERS = ("fedavg", "fedadam")  # what make_server_optimizer builds


def make_server_optimizer(name: str, *, lr: float, beta1: float, beta2: float, eps: float) -> ServerOptimizer:
    """The optimizer ``[server] optimizer`` names, with its hyperparameters; ValueError for an unknown name."""
    if name == "fedavg":
        return FedAvg(lr)
    if name == "fedadam":
        return FedAdam(lr, beta1, beta2, eps)
    raise ValueError(f"unknown server optimizer {name!r}")
