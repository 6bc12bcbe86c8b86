"""Aggregation math against hand computations; bad updates are refused before they count."""

from __future__ import annotations

import pytest
import torch

from coordinator.strategy import FedAdam, FedAvg, UpdateRejected, check_update, weighted_mean


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
        ({"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}, "non-finite"),
        ({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(3)}, "non-finite"),
    ],
)
def test_check_update_refuses_wrong_names_shapes_dtypes_and_values(update: dict, match: str) -> None:
    expected = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(UpdateRejected, match=match):
        check_update(update, expected)
