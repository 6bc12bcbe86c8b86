"""The round messages' schema: instructions and reports round-trip, every value of a reply is checked before
use (a bad one is refused naming the field), and a message of another wire version gets a clear error."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.codec import Message, decode_message, encode_message
from protos.wire import (
    VERSION_KEY,
    WIRE_VERSION,
    ClientDPInstruction,
    ClientReport,
    DeclineReason,
    LocalDPInstruction,
    ReplyRejected,
    SecAggInstruction,
    Stage,
    TrainInstruction,
    WireError,
    WireVersionError,
    read_report,
    refusal,
)

V = {VERSION_KEY: WIRE_VERSION}



def test_an_honest_report_reads_back() -> None:
    config = {"num_examples": 60, "train_loss": 3.1, "steps": 3, "seconds_train": 0.5, "epsilon": 1.2,
              "epsilon_expected": 1.2, "noise_multiplier": 0.9, "delta": 1e-5, "update_norm": 0.4,
              "secagg_weight": 0.006, "reason": "", "something_new": {"nested": [1, 2]}, **V}
    assert read_report(config) == ClientReport(num_examples=60, train_loss=3.1, steps=3, seconds_train=0.5,
                                               epsilon=1.2, epsilon_expected=1.2, noise_multiplier=0.9, delta=1e-5,
                                               update_norm=0.4, secagg_weight=0.006)
    assert read_report(V) == ClientReport()
    assert read_report({"train_loss": 2, **V}).train_loss == 2.0  # JSON integers are numbers too


@pytest.mark.parametrize(("config", "field"), [
    ({"num_examples": "lots"}, "num_examples"),
    ({"num_examples": math.inf}, "num_examples"),
    ({"num_examples": 1e308}, "num_examples"),  # a float: a client inflating its weight
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
        read_report({**V, **config})
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_the_values_python_json_accepts_from_the_wire_are_refused() -> None:
    """Python's json parser reads NaN and Infinity: what a hostile client's raw header can carry."""
    config = json.loads(f'{{"num_examples": Infinity, "train_loss": NaN, "wire_version": {WIRE_VERSION}}}')
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
        report = read_report({**config, **V})
    except ReplyRejected:
        return
    for name, value in vars(report).items():
        if isinstance(value, float):
            assert math.isfinite(value), name
    if report.num_examples is not None:
        assert isinstance(report.num_examples, int) and report.num_examples >= 1
    if report.secagg_weight is not None:
        assert 0.0 <= report.secagg_weight <= 1.0


def test_instructions_round_trip_through_the_codec() -> None:
    local = LocalDPInstruction(delta=1e-5, max_grad_norm=1.0, max_epsilon=8.0, rounds=5, accountant="prv",
                               head_clip_fraction=0.25, noise_multiplier=1.1)
    calibrating = LocalDPInstruction(delta=1e-5, max_grad_norm=1.0, max_epsilon=8.0, rounds=5, target_epsilon=4.0)
    client = ClientDPInstruction(clip_norm=0.5, noise_multiplier=1.0, distributed=True, num_clients=3)
    for train in (TrainInstruction(local_steps=3, batch_size=16, lr=5e-4),
                  TrainInstruction(local_steps=3, batch_size=1024, lr=5e-4, physical_batch_size=64,
                                   cache_frozen_prefix=True, weight_decay=0.01, head_lr=5e-3, seed=7,
                                   local_dp=local, client_dp=client),
                  TrainInstruction(local_steps=1, batch_size=8, lr=1e-3, local_dp=calibrating)):
        wire = decode_message(encode_message(Message(2, Stage.TRAIN, train.to_config())))
        assert wire.stage == "train" and wire.config[VERSION_KEY] == WIRE_VERSION
        assert TrainInstruction.from_config(wire.config) == train
        secure = SecAggInstruction(client_index=4, secagg_stage="masked_input", weight_cap=1000.0, train=train)
        assert SecAggInstruction.from_config(secure.to_config()) == secure
    setup = SecAggInstruction(client_index=0, secagg_stage="setup", weight_cap=1000.0)
    assert SecAggInstruction.from_config(setup.to_config()) == setup


def test_reports_round_trip_and_refusals_carry_a_code() -> None:
    report = ClientReport(num_examples=60, train_loss=1.5, steps=3, seconds_train=0.2, epsilon=0.5)
    assert read_report(report.to_config()) == report
    declined = refusal(3, DeclineReason.BUDGET_EXHAUSTED, "privacy budget exhausted: ...",
                       report=ClientReport(epsilon=7.9))
    assert declined.round == 3 and declined.stage == Stage.DECLINED
    read = read_report(decode_message(encode_message(declined)).config)
    assert read.reason_code is DeclineReason.BUDGET_EXHAUSTED and read.epsilon == 7.9
    failed = refusal(3, DeclineReason.FAILED, "boom", stage=Stage.ERROR)
    assert failed.stage == "error" and read_report(failed.config).reason == "boom"
    with pytest.raises(ReplyRejected, match="reason_code"):
        read_report({**V, "reason_code": "felt like it"})


@pytest.mark.parametrize("version", [None, 1, 2, 3, 5, "4", True])
def test_a_message_of_another_wire_version_gets_a_clear_error_not_a_key_error(version: Any) -> None:
    """Version 1 wrote no wire_version; version 2 keyed SecAgg+ pair masks with 256 bits (its masks would
    not cancel against this release's); version 3 sent no next-round keys with its unmask replies (this
    release's server would refuse them); a later one may write 5."""
    old_train = {"local_steps": 3, "batch_size": 16, "lr": 5e-4, "seed": 0}  # what version 1 sent
    old_reply = {"num_examples": 60, "train_loss": 1.5, "steps": 3}  # what a version-1 client answered
    if version is not None:
        old_train[VERSION_KEY] = old_reply[VERSION_KEY] = version
    with pytest.raises(WireVersionError, match=r"the coordinator speaks wire version .* this side speaks 4"):
        TrainInstruction.from_config(old_train)
    with pytest.raises(WireVersionError, match="wire version"):
        SecAggInstruction.from_config({"secagg_id": 1, "secagg_stage": "setup", "secagg_weight_cap": 1.0, **old_train})
    with pytest.raises(ReplyRejected, match=r"the client speaks wire version .* this side speaks 4"):
        read_report(old_reply)


def test_a_current_message_missing_a_key_names_it() -> None:
    with pytest.raises(WireError, match="lacks 'batch_size'"):
        TrainInstruction.from_config({**V, "local_steps": 3, "lr": 1e-3})
    with pytest.raises(WireError, match="lacks 'num_clients'"):
        TrainInstruction.from_config({**V, "local_steps": 3, "batch_size": 8, "lr": 1e-3,
                                      "client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}})
