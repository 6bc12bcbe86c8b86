"""Every value of a reply's config is checked before use; a bad one is refused naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.replies import ClientReport, ReplyRejected, read_report


def test_an_honest_report_reads_back() -> None:
    config = {"num_examples": 60, "train_loss": 3.1, "steps": 3, "seconds_train": 0.5, "epsilon": 1.2,
              "epsilon_expected": 1.2, "noise_multiplier": 0.9, "delta": 1e-5, "update_norm": 0.4,
              "secagg_weight": 0.006, "reason": "", "something_new": {"nested": [1, 2]}}
    assert read_report(config) == ClientReport(num_examples=60, train_loss=3.1, steps=3, seconds_train=0.5,
                                               epsilon=1.2, epsilon_expected=1.2, noise_multiplier=0.9, delta=1e-5,
                                               update_norm=0.4, secagg_weight=0.006)
    assert read_report({}) == ClientReport()
    assert read_report({"train_loss": 2}).train_loss == 2.0  # JSON integers are numbers too


@pytest.mark.parametrize(("config", "field"), [
    ({"num_examples": "lots"}, "num_examples"),
    ({"num_examples": math.inf}, "num_examples"),
    ({"num_examples": 1e308}, "num_examples"),  # a float: the weight attack of the issue
    ({"num_examples": 10**30}, "num_examples"),
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": -5}, "num_examples"),
    ({"num_examples": True}, "num_examples"),
    ({"num_examples": [60]}, "num_examples"),
    ({"train_loss": "x"}, "train_loss"),
    ({"train_loss": math.nan}, "train_loss"),
    ({"train_loss": -math.inf}, "train_loss"),
    ({"seconds_train": "fast"}, "seconds_train"),
    ({"seconds_train": -1}, "seconds_train"),
    ({"epsilon": math.nan}, "epsilon"),
    ({"epsilon": -0.5}, "epsilon"),
    ({"noise_multiplier": {"x": 1}}, "noise_multiplier"),
    ({"delta": 2.0}, "delta"),
    ({"steps": 2.5}, "steps"),
    ({"secagg_weight": 8.0}, "secagg_weight"),
    ({"secagg_weight": -1.9}, "secagg_weight"),
    ({"reason": 5}, "reason"),
])
def test_hostile_values_are_refused_naming_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ReplyRejected, match=field) as info:
        read_report(config)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_the_values_python_json_accepts_from_the_wire_are_refused() -> None:
    """Python's json parser reads NaN and Infinity: what a hostile client's raw header can carry."""
    config = json.loads('{"num_examples": Infinity, "train_loss": NaN}')
    with pytest.raises(ReplyRejected, match="num_examples must be finite"):
        read_report(config)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
KEYS = st.sampled_from(["num_examples", "train_loss", "steps", "seconds_train", "epsilon", "epsilon_expected",
                        "noise_multiplier", "delta", "update_norm", "secagg_weight", "reason", "other"])


@settings(max_examples=500, deadline=None)
@given(config=st.dictionaries(KEYS, JSON, max_size=6))
def test_any_json_gives_a_checked_report_or_a_named_refusal(config: dict[str, Any]) -> None:
    try:
        report = read_report(config)
    except ReplyRejected:
        return
    for name, value in vars(report).items():
        if isinstance(value, float):
            assert math.isfinite(value), name
    if report.num_examples is not None:
        assert isinstance(report.num_examples, int) and report.num_examples >= 1
    if report.secagg_weight is not None:
        assert 0.0 <= report.secagg_weight <= 1.0
