"""How far one client may move the model in a round: the bounds the coordinator enforces.

An honest client runs ``local_steps`` steps of AdamW (``client/trainer.py``,
torch's default betas). Whatever its gradients, bias-corrected Adam moves a
coordinate by at most a known factor times the learning rate per step
(Cauchy-Schwarz on the moment sums: the factor is 1 at the first step and
never above about 7.3 for betas (0.9, 0.999)). So the largest update an
honest client can send follows from the job's ``[train]`` settings and the
current global state alone, and no client can move it:

- without secure aggregation, an update whose L2 norm exceeds
  :func:`plain_update_bound` is refused;
- under SecAgg+, the quantizer's per-coordinate range ``c`` is
  :func:`secure_clipping_range`.

Under client-level DP the update is clipped to ``clip_norm`` before its noise
share is added; the bounds then allow ``clip_norm`` plus what the noise share
can reach (10 standard deviations of its norm, 8 of one coordinate).
A job may also fix both bounds (``[server] max_update_norm``,
``[privacy.secure_aggregation] clipping_range``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from coordinator.config import JobConfig

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the client's trainer uses
HONEST_MARGIN = 1.25  # headroom over the worst honest case (float rounding, eps)
NOISE_SIGMAS_NORM = 10.0  # the norm of d Gaussian coordinates stays within sqrt(d) + 10 sigma (chi tail)
NOISE_SIGMAS_COORD = 8.0  # one coordinate of a noise share stays within 8 sigma (P ~ 1e-15)


def adam_step_factor(step: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Largest |m_hat / sqrt(v_hat)| bias-corrected Adam can reach at ``step`` (1-based), any gradients.

    |m_t| <= (1 - b1) sqrt(sum gamma^j) sqrt(v_t / (1 - b2)) with gamma = b1^2 / b2 (Cauchy-Schwarz), then the two
    bias corrections. Needs b1^2 < b2, as for every usual choice.
    """
    b1, b2 = betas
    gamma = b1 * b1 / b2
    if not 0 <= gamma < 1:
        raise ValueError(f"Adam's bound needs beta1^2 < beta2, got {betas}")
    return ((1 - b1) / (1 - b1**step) * math.sqrt((1 - b2**step) / (1 - b2))
            * math.sqrt((1 - gamma**step) / (1 - gamma)))


def adam_travel(steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Sum of :func:`adam_step_factor` over ``steps`` steps: the most one coordinate moves, in units of lr."""
    return sum(adam_step_factor(t, betas) for t in range(1, steps + 1))


def _state_norms(state: Mapping[str, torch.Tensor]) -> tuple[int, float, float]:
    """(values, L2 norm, largest |value|) of a state, in float64."""
    values, square, largest = 0, 0.0, 0.0
    for tensor in state.values():
        t = tensor.detach().to(torch.float64)
        values += t.numel()
        if t.numel():
            square += float((t * t).sum())
            largest = max(largest, float(t.abs().max()))
    return values, math.sqrt(square), largest


def honest_adamw_bounds(config: JobConfig, global_state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(L2 norm, largest coordinate) of the update an honest client's AdamW can make this round, with margin.

    Decoupled weight decay a = lr * weight_decay pulls every weight toward 0 by |1 - (1 - a)^T| of its value and
    can grow the Adam steps by at most max(1, |1 - a|)^T.
    """
    train = config.train
    steps = train.local_steps
    lr = max(train.lr, train.head_lr)
    decay = lr * train.weight_decay
    growth = max(1.0, abs(1.0 - decay)) ** steps
    pull = abs(1.0 - (1.0 - decay) ** steps)
    values, norm, largest = _state_norms(global_state)
    travel = lr * adam_travel(steps) * growth
    return (HONEST_MARGIN * (travel * math.sqrt(values) + pull * norm),
            HONEST_MARGIN * (travel + pull * largest))


def _noise_std(config: JobConfig, num_sampled: int) -> float:
    """Per-coordinate std of one client's distributed noise share (0 when the coordinator adds the noise)."""
    client_dp = config.privacy.client_dp
    if not (client_dp.enabled and client_dp.distributed):
        return 0.0
    return client_dp.noise_multiplier * client_dp.clip_norm / math.sqrt(max(num_sampled, 1))


def plain_update_bound(config: JobConfig, global_state: Mapping[str, torch.Tensor], num_sampled: int) -> float:
    """The L2 norm no plain update may exceed this round."""
    if config.server.max_update_norm > 0:
        return config.server.max_update_norm
    norm, _ = honest_adamw_bounds(config, global_state)
    client_dp = config.privacy.client_dp
    if not client_dp.enabled:
        return norm
    values = sum(t.numel() for t in global_state.values())
    clipped = min(norm, client_dp.clip_norm * (1 + 1e-5))
    return clipped + _noise_std(config, num_sampled) * (math.sqrt(values) + NOISE_SIGMAS_NORM)


def secure_clipping_range(config: JobConfig, global_state: Mapping[str, torch.Tensor], num_sampled: int) -> float:
    """The quantizer's per-coordinate range c for this round's secure sum."""
    fixed = config.privacy.secure_aggregation.clipping_range
    if fixed > 0:
        return fixed
    _, coordinate = honest_adamw_bounds(config, global_state)
    client_dp = config.privacy.client_dp
    if client_dp.enabled:
        coordinate = min(coordinate, client_dp.clip_norm * HONEST_MARGIN)
    return coordinate + NOISE_SIGMAS_COORD * _noise_std(config, num_sampled)
