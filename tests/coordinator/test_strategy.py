"""Aggregation math against hand computations; bad updates are refused before they count."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from coordinator.plain_phase import aggregation_order
from coordinator.strategy import FedAdam, FedAvg, UpdateRejected, check_update, update_norm, weighted_mean


def test_weighted_mean_weights_by_examples() -> None:
    updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    mean = weighted_mean(updates, [1.0, 3.0])
    torch.testing.assert_close(mean["w"], torch.tensor([0.25, 3.0]))


def test_fedavg_applies_the_mean_delta_with_server_lr() -> None:
    out = FedAvg(lr=0.5).step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    torch.testing.assert_close(out["w"], torch.tensor([2.0]))


def test_fedadam_matches_the_adam_recursion() -> None:
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    state = {"w": torch.tensor([0.0])}
    m = v = 0.0
    x = 0.0
    for d in (1.0, -0.5, 0.25):
        state = opt.step(state, {"w": torch.tensor([d])})
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d * d
        x = x + 0.1 * m / (v**0.5 + 1e-3)
        assert float(state["w"]) == pytest.approx(x, rel=1e-5)
    restored = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    restored.load_state_dict(opt.state_dict())
    torch.testing.assert_close(restored.step(state, {"w": torch.tensor([1.0])})["w"],
                               opt.step(state, {"w": torch.tensor([1.0])})["w"])


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"w": torch.zeros(2, 2)}, "missing"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3), "x": torch.zeros(1)}, "unexpected"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, "shape"),
        ({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}, "dtype"),
        ({"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}, "^w: non-finite"),
        ({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(3)}, "^w: non-finite"),
        ({"w": torch.zeros(2, 3), "b": torch.tensor([0.0, -float("inf"), 0.0])}, "^b: non-finite"),
        ({"w": torch.full((2, 3), 3e38), "b": torch.tensor([1.0, float("nan"), 0.0])}, "^b: non-finite"),
    ],
)
def test_check_update_refuses_wrong_names_shapes_dtypes_and_values(update: dict, match: str) -> None:
    expected = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(UpdateRejected, match=match):
        check_update(update, expected)


def test_check_update_returns_the_norm_even_of_the_largest_finite_values() -> None:
    """Finiteness is read off the float64 norm: float32's largest values must not look non-finite."""
    expected = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    update = {"w": torch.full((2, 3), torch.finfo(torch.float32).max), "b": torch.tensor([3.0, 4.0, 0.0])}
    norm = check_update(update, expected)
    assert norm == update_norm(update) and math.isfinite(norm) and norm > 1e38


def test_aggregation_order_follows_content_not_arrival() -> None:
    """Equal weights (client-level DP) and updates that differ only past their first bytes: every arrival order
    sums in one order, so drivers that name clients differently aggregate bit for bit the same way."""
    base = torch.arange(200, dtype=torch.float32)
    updates = []
    for tail in (3.0, 1.0, 2.0):
        late = base.clone()
        late[-1] = tail  # beyond the first 256 bytes: only the digest tells these apart
        updates.append({"a": base.clone(), "b": late})
    updates.append({"a": -base, "b": base.clone()})
    weights = [1.0, 1.0, 1.0, 1.0]
    reference = [updates[i]["b"][-1].item() for i in aggregation_order(updates, weights)]
    for permutation in itertools.permutations(range(4)):
        shuffled = [updates[i] for i in permutation]
        order = aggregation_order(shuffled, weights)
        assert [shuffled[i]["b"][-1].item() for i in order] == reference
    assert len(set(reference)) == 4
    heavier = aggregation_order(updates, [2.0, 1.0, 1.0, 1.0])
    assert heavier[-1] == 0  # weight first


def test_median_and_trimmed_mean_resist_one_wild_update() -> None:
    from coordinator.strategy import robust_mean

    honest = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.2, 2.2])}, {"w": torch.tensor([0.8, 1.8])},
              {"w": torch.tensor([1.1, 2.1])}]
    wild = {"w": torch.tensor([1e6, -1e6])}
    median = robust_mean([*honest, wild], "median")["w"]
    assert torch.all((median - torch.tensor([1.1, 2.0])).abs() < 0.11)
    trimmed = robust_mean([*honest, wild], "trimmed_mean", trim_fraction=0.2)["w"]
    assert float(trimmed.abs().max()) < 3.0
    assert float(weighted_mean([*honest, wild], [1.0] * 5)["w"].abs().max()) > 1e5  # what the mean does


def test_robust_aggregators_are_refused_with_secure_aggregation() -> None:
    from pathlib import Path

    from coordinator.config import ConfigError, parse_job

    with pytest.raises(ConfigError, match="secure aggregation hides"):
        parse_job({"server": {"aggregator": "median"}, "privacy": {"secure_aggregation": {"enabled": True}}},
                  Path("."))
