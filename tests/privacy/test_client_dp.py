"""Client-level DP: the clipping bound, and the variance the distributed noise really adds."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.client_dp import (
    ClientDPError,
    central_noise,
    clip_update,
    distributed_noise_share,
    effective_noise_multiplier,
    noise_std,
    update_norm,
)

# Sample-variance check: with N i.i.d. normal draws the relative standard error of the
# sample variance is sqrt(2/N). N = 200_000 → 0.32 %; we allow 5 standard errors (1.6 %),
# a false-failure probability below 1e-6 for a fixed seed that is anyway deterministic.
N = 200_000
VAR_TOL = 5 * math.sqrt(2 / N)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention (100x slower on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zeros_update() -> dict[str, torch.Tensor]:
    return {"a.lora_A": torch.zeros(N // 2), "a.lora_B": torch.zeros(N // 4, 2)}


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in update.values()])


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=4),
    log_scale=st.floats(-6, 6),
    clip_norm=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_clipping_bound_holds_on_every_clipped_update(
    shapes: list[list[int]], log_scale: float, clip_norm: float, seed: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    update = {
        f"t{i}": (torch.randn(shape, generator=gen) * 10**log_scale).to(dtype)
        for i, shape in enumerate(shapes)
    }
    clipped, norm = clip_update(update, clip_norm)
    assert norm == pytest.approx(update_norm(update), rel=1e-12)
    assert update_norm(clipped) <= clip_norm  # the bound, exactly, in the update's dtype
    assert {k: (v.shape, v.dtype) for k, v in clipped.items()} == {
        k: (v.shape, v.dtype) for k, v in update.items()
    }
    if norm <= clip_norm:  # untouched when already inside the ball
        for k in update:
            assert torch.equal(clipped[k], update[k])
    elif dtype != torch.bfloat16:  # same direction, norm exactly (to rounding) S
        assert update_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)
        cos = torch.dot(flat(clipped), flat(update)) / (update_norm(clipped) * norm)
        assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_clip_rejects_non_finite_and_bad_norm() -> None:
    with pytest.raises(ClientDPError, match="non-finite values in b"):
        clip_update({"a": torch.ones(3), "b": torch.tensor([1.0, math.nan])}, 1.0)
    with pytest.raises(ClientDPError, match="non-finite"):
        clip_update({"a": torch.tensor([math.inf])}, 1.0)
    with pytest.raises(ClientDPError, match="clip_norm"):
        clip_update({"a": torch.ones(3)}, 0.0)


def test_distributed_shares_sum_to_the_central_variance() -> None:
    clip, sigma, n = 0.5, 1.3, 7
    target_var = noise_std(clip_norm=clip, noise_multiplier=sigma) ** 2
    shares = [
        distributed_noise_share(zeros_update(), clip_norm=clip, noise_multiplier=sigma,
                                num_clients=n, generator=torch.Generator().manual_seed(100 + i))
        for i in range(n)
    ]
    one = flat(shares[0])
    assert one.var().item() / (target_var / n) == pytest.approx(1.0, abs=VAR_TOL)
    total = torch.stack([flat(s) for s in shares]).sum(0)
    assert total.var().item() / target_var == pytest.approx(1.0, abs=VAR_TOL)
    assert abs(total.mean().item()) < 5 * math.sqrt(target_var / N)
    # ... the same variance the coordinator-side variant adds in one go.
    central = flat(central_noise(zeros_update(), clip_norm=clip, noise_multiplier=sigma,
                                 generator=torch.Generator().manual_seed(7)))
    assert central.var().item() / target_var == pytest.approx(1.0, abs=VAR_TOL)


def test_fewer_completions_leave_less_noise() -> None:
    clip, sigma, n, m = 1.0, 1.0, 10, 6
    partial = torch.stack([
        flat(distributed_noise_share(zeros_update(), clip_norm=clip, noise_multiplier=sigma,
                                     num_clients=n, generator=torch.Generator().manual_seed(i)))
        for i in range(m)
    ]).sum(0)
    # The sum of m of n shares carries (m/n)(σS)²: exactly σ_eff = σ·sqrt(m/n).
    sigma_eff = effective_noise_multiplier(sigma, num_clients=n, completed_clients=m)
    assert sigma_eff == pytest.approx(sigma * math.sqrt(m / n))
    assert partial.var().item() / (sigma_eff * clip) ** 2 == pytest.approx(1.0, abs=VAR_TOL)
    with pytest.raises(ClientDPError, match="completed_clients"):
        effective_noise_multiplier(sigma, num_clients=3, completed_clients=4)


def test_noise_is_added_to_the_update_not_replacing_it() -> None:
    update = {"w": torch.full((N,), 3.0)}
    noised = distributed_noise_share(update, clip_norm=1.0, noise_multiplier=1.0, num_clients=4,
                                     generator=torch.Generator().manual_seed(0))["w"]
    assert noised.dtype == torch.float32
    assert noised.mean().item() == pytest.approx(3.0, abs=5 * 0.5 / math.sqrt(N))
    assert torch.equal(update["w"], torch.full((N,), 3.0))  # input untouched
    with pytest.raises(ClientDPError, match="num_clients"):
        distributed_noise_share(update, clip_norm=1.0, noise_multiplier=1.0, num_clients=0,
                                generator=torch.Generator())
