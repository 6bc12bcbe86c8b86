"""Stochastic quantization into Z_2^32: unbiased, bounded error, no wrap, no NaN."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.errors import QuantizationError
from privacy.secagg.quantize import (
    MODULUS,
    dequantize_sum,
    error_bound,
    levels_for,
    quantize,
)


def test_levels_never_wrap() -> None:
    for n in (1, 2, 3, 10, 50, 100, 1000, 2**20):
        levels = levels_for(n)
        assert levels * n < MODULUS <= (levels + 1) * n  # the largest such grid
    with pytest.raises(ValueError, match="positive integer"):
        levels_for(0)


def test_stochastic_rounding_is_unbiased() -> None:
    """On a coarse grid (step 0.2) the mean of many roundings matches the value."""
    rng = np.random.default_rng(0)
    c, levels, draws = 1.0, 10, 200_000
    for x in (0.13, -0.77, 0.5, 0.999):
        q = quantize(np.full(draws, x, dtype=np.float64), c, levels, rng)
        scaled = (x + c) * levels / (2 * c)
        assert set(np.unique(q).tolist()) <= {int(np.floor(scaled)), int(np.ceil(scaled))}
        p = scaled - np.floor(scaled)
        std = np.sqrt(p * (1 - p) / draws)
        assert abs(q.mean() - scaled) < 5 * std + 1e-12
        deq = dequantize_sum(q.astype(np.uint32), 1, c, levels)
        assert abs(deq.mean() - x) < 5 * std * 2 * c / levels + 1e-12


def test_grid_points_are_exact() -> None:
    rng = np.random.default_rng(1)
    levels, c = 8, 2.0
    grid = np.linspace(-c, c, levels + 1)
    q = quantize(grid, c, levels, rng)
    np.testing.assert_array_equal(q, np.arange(levels + 1))
    np.testing.assert_allclose(dequantize_sum(q, 1, c, levels), grid, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 200),
    c=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_error_is_below_bound(n: int, c: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    levels = levels_for(n)
    xs = rng.uniform(-c, c, (n, 256)).astype(np.float32)
    xs[0, :4] = [c, -c, 2 * c, -3 * c]  # clipped ends
    total = np.zeros(256, dtype=np.uint32)
    for x in xs:
        total += quantize(x, c, levels, rng)
    exact = np.clip(xs.astype(np.float64), -c, c).sum(axis=0)
    err = np.abs(dequantize_sum(total, n, c, levels) - exact)
    assert err.max() < error_bound(n, c, levels)


def test_largest_sum_does_not_wrap() -> None:
    n, c = 100, 1.0
    levels = levels_for(n)
    rng = np.random.default_rng(2)
    total = np.zeros(4, dtype=np.uint32)
    for _ in range(n):
        total += quantize(np.full(4, c, dtype=np.float32), c, levels, rng)
    assert int(total[0]) == n * levels
    np.testing.assert_allclose(dequantize_sum(total, n, c, levels), n * c, atol=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    x = np.zeros(10, dtype=np.float32)
    x[7] = bad
    with pytest.raises(QuantizationError, match=r"non-finite value\(s\) \(first at index 7"):
        quantize(x, 1.0, 100, np.random.default_rng(0))


def test_wrong_inputs_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(QuantizationError, match="float dtype"):
        quantize(np.zeros(3, dtype=np.int32), 1.0, 10, rng)
    with pytest.raises(QuantizationError, match="1-D"):
        quantize(np.zeros((2, 2)), 1.0, 10, rng)
