"""Client-level differential privacy for federated averaging (DP-FedAvg, McMahan et al. 2018).

Each client clips its whole model delta to L2 norm ``S`` (one norm over all tensors, so
a client's influence on the sum is at most ``S``), and the *sum* of the clipped
updates carries Gaussian noise N(0, (σS)²) per coordinate. Then one round is a Gaussian
mechanism with sensitivity S and noise multiplier σ, and rounds compose in a
PrivacyLedger (one step per round, sample rate = clients per round / clients).

Two ways to add that noise:

* ``central_noise`` — the coordinator adds it to the aggregate; it sees the un-noised sum.
* ``distributed_noise_share`` — each of the n sampled clients adds N(0, (σS)²/n) before
  masking; under secure aggregation nobody ever sees the un-noised sum. If only m < n
  clients complete, the sum carries only m/n of the variance: the round's effective
  noise multiplier is σ·sqrt(m/n) (``effective_noise_multiplier``), and that, not σ, is
  what the coordinator must record in the ledger.

Clipping and noising run on the client before masking: under secure aggregation the
server cannot check one update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ClientDPError(ValueError):
    """Bad client-level DP input (non-finite update, non-positive clip norm, ...)."""


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ClientDPError(f"{name} must be finite and {bound}, got {value}")


def update_norm(update: dict[str, Tensor]) -> float:
    """L2 norm of all tensors of ``update`` taken together (float64 accumulation)."""
    total = torch.zeros((), dtype=torch.float64)
    for tensor in update.values():
        total += tensor.detach().to(torch.float64).pow(2).sum().cpu()
    return float(total.sqrt())


def clip_update(update: dict[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip_norm``.

    Returns the clipped update (new tensors, same dtypes) and the original norm. Raises
    ClientDPError on NaN/Inf: clipping cannot bound a non-finite update, and under secure
    aggregation nobody downstream could catch it.
    """
    _check_positive("clip_norm", clip_norm)
    norm = update_norm(update)
    if not math.isfinite(norm):
        bad = [name for name, t in update.items() if not bool(torch.isfinite(t).all())]
        raise ClientDPError(f"update has non-finite values in {', '.join(bad) or 'its norm'}")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    # Computed in float64 then cast back, so rounding cannot push the norm above S.
    clipped = {
        name: (t.detach().to(torch.float64) * scale).to(t.dtype) for name, t in update.items()
    }
    # Rounding back to a low-precision dtype (bfloat16 has 8 bits of mantissa) can push
    # the norm above S; shrink by a few ulps of the coarsest dtype until it holds.
    ulp = max((torch.finfo(t.dtype).eps for t in update.values() if t.is_floating_point()),
              default=0.0)
    for _ in range(16):
        clipped_norm = update_norm(clipped)
        if clipped_norm <= clip_norm:
            return clipped, norm
        shrink = clip_norm / clipped_norm * (1 - 2 * ulp)
        clipped = {name: (t.to(torch.float64) * shrink).to(t.dtype) for name, t in clipped.items()}
    raise ClientDPError(f"could not clip the update to {clip_norm} in its dtype")


def noise_std(*, clip_norm: float, noise_multiplier: float) -> float:
    """Standard deviation σ·S of the Gaussian noise the sum of clipped updates must carry."""
    _check_positive("clip_norm", clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    return noise_multiplier * clip_norm


def _gaussian_like(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float64, device="cpu")
    return (noise * std).to(dtype=t.dtype if t.is_floating_point() else torch.float32)


def _add_noise(update: dict[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in update.items():
        if not t.is_floating_point():
            raise ClientDPError(f"{name}: cannot add Gaussian noise to a {t.dtype} tensor")
        out[name] = t.detach() + _gaussian_like(t, std, generator).to(t.device)
    return out


def distributed_noise_share(
    update: dict[str, Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_clients: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``update`` (already clipped) plus this client's share N(0, (σS)²/num_clients).

    ``num_clients`` is the number of clients *sampled* for the round; the shares of all of
    them sum to N(0, (σS)²). Fewer completions leave less noise in the sum: see the module
    docstring and ``effective_noise_multiplier``. The generator must be seeded from OS
    entropy in production (a predictable seed lets anyone subtract the noise).
    """
    if num_clients < 1:
        raise ClientDPError(f"num_clients must be >= 1, got {num_clients}")
    std = noise_std(clip_norm=clip_norm, noise_multiplier=noise_multiplier) / math.sqrt(num_clients)
    return _add_noise(update, std, generator)


def central_noise(
    summed_update: dict[str, Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Coordinator-side DP-FedAvg: the *sum* of clipped updates plus N(0, (σS)²).

    Add before dividing by the number (or expected number) of clients.
    """
    return _add_noise(
        summed_update, noise_std(clip_norm=clip_norm, noise_multiplier=noise_multiplier), generator
    )


def effective_noise_multiplier(
    noise_multiplier: float, *, num_clients: int, completed_clients: int
) -> float:
    """Noise multiplier the aggregate actually carries when ``completed_clients`` of the
    ``num_clients`` sampled clients added their distributed share: σ·sqrt(m/n).

    Record this in the ledger; a round with no completed client released nothing.
    """
    if not (0 <= completed_clients <= num_clients) or num_clients < 1:
        raise ClientDPError(
            f"need 0 <= completed_clients <= num_clients and num_clients >= 1, "
            f"got {completed_clients} of {num_clients}"
        )
    return noise_multiplier * math.sqrt(completed_clients / num_clients)
