"""The SecAgg+ server: forged, replayed and misdirected replies are rejected, not fatal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from privacy.secagg import Payload, SecAggAborted, SecAggError, SecAggPlusServer, Stage
from privacy.secagg.messages import Key, ints
from tests.privacy.test_secagg_driver import make_inputs, new_round

N, SIZE = 10, 16
Tamper = Callable[[dict[int, Payload], dict[int, Payload]], None]


def _drive(tamper: dict[str, Tamper]) -> tuple[SecAggPlusServer, dict[int, np.ndarray]]:
    """Run a round where tamper[stage](replies, previous_replies) may edit the replies."""
    server, clients = new_round(N, size=SIZE)
    inputs = make_inputs(N, SIZE, 1.0)
    outgoing = server.start()
    previous: dict[int, Payload] = {}
    while not server.done:
        stage = str(server.stage)
        replies = {
            cid: clients[cid].handle(msg, inputs[cid] if stage == Stage.MASKED_INPUT else None)
            for cid, msg in outgoing.items()
        }
        edit = tamper.get(stage)
        if edit is not None:
            edit(replies, previous)
        previous = replies
        outgoing = server.step(replies)
    return server, inputs


def _expected_sum(inputs: dict[int, np.ndarray], ids: list[int]) -> np.ndarray:
    return np.sum([inputs[i].astype(np.float64) for i in ids], axis=0)


def test_replayed_reply_from_an_earlier_stage_is_rejected() -> None:
    def replay(replies: dict[int, Payload], previous: dict[int, Payload]) -> None:
        replies[3] = previous[3]  # client 3's setup reply delivered again at share_keys

    server, inputs = _drive({Stage.SHARE_KEYS: replay})
    assert "replayed or stale" in server.rejected[3]
    assert 3 not in server.included_clients
    got = server.result()
    ids = [i for i in range(N) if i != 3]
    assert np.abs(got - _expected_sum(inputs, ids)).max() < server.error_bound


def test_reply_from_another_round_is_rejected() -> None:
    def other_round(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        replies[5] = {**replies[5], Key.ROUND: ints(0)}

    server, _ = _drive({Stage.MASKED_INPUT: other_round})
    assert "round 0" in server.rejected[5]
    assert 5 not in server.included_clients


def test_misattributed_and_unexpected_replies_are_rejected() -> None:
    def forge(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        replies[1] = replies[2]  # client 2's keys delivered as client 1's
        replies[99] = replies[4]  # nobody asked client 99

    server, _ = _drive({Stage.SETUP: forge})
    assert "claims sender 2" in server.rejected[1]
    assert "unexpected reply" in server.rejected[99]
    assert 1 not in server.included_clients


def test_masked_input_of_the_wrong_shape_is_rejected() -> None:
    def shorten(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        replies[6] = {**replies[6], Key.MASKED_INPUT: replies[6][Key.MASKED_INPUT][:-1]}

    server, _ = _drive({Stage.MASKED_INPUT: shorten})
    assert "masked_input" in server.rejected[6]
    assert 6 not in server.included_clients


def test_shares_for_clients_not_asked_are_rejected() -> None:
    def extra(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        msg = replies[7]
        replies[7] = {
            **msg,
            Key.SEED_SHARE_OWNERS: msg[Key.SEED_SHARE_OWNERS][:-1],
            Key.SEED_SHARES: msg[Key.SEED_SHARES][:-1],
        }

    server, inputs = _drive({Stage.UNMASK: extra})
    assert "other clients than asked" in server.rejected[7]
    # client 7 is still in the sum: its masked input arrived; others' shares suffice
    assert 7 in server.included_clients
    got = server.result()
    assert np.abs(got - _expected_sum(inputs, list(range(N)))).max() < server.error_bound


def test_a_corrupted_share_is_detected_not_silently_summed() -> None:
    """A wrong Shamir share would unmask to garbage: the seed commitment catches it."""

    def corrupt(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        for msg in replies.values():
            msg[Key.SEED_SHARES][:, 0] ^= 0xFF

    with pytest.raises(SecAggAborted, match=r"self-mask seed of client .* fails verification"):
        _drive({Stage.UNMASK: corrupt})


def test_driver_misuse() -> None:
    server, _ = new_round(3)
    with pytest.raises(SecAggError, match="step"):
        server.step({})
    server.start()
    with pytest.raises(SecAggError, match="start"):
        server.start()
    with pytest.raises(SecAggError, match="no result"):
        server.result()


def test_one_bad_share_holder_is_outvoted_and_named() -> None:
    """Spare shares let the server skip a lying neighbour: right sum, liar in `rejected`."""

    def corrupt_one(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        replies[0][Key.SEED_SHARES][:, 3] ^= 0x5A  # the first holder: its shares get used

    server, inputs = _drive({Stage.UNMASK: corrupt_one})
    assert "sent a bad share" in server.rejected[0]
    assert set(server.rejected) == {0}
    got = server.result()
    assert np.abs(got - _expected_sum(inputs, list(range(N)))).max() < server.error_bound


def test_a_bad_key_share_of_a_dropped_client_is_outvoted() -> None:
    def drop_and_corrupt(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        del replies[2]  # client 2 drops before sending its masked input

    def corrupt(replies: dict[int, Payload], _: dict[int, Payload]) -> None:
        holder = next(c for c, m in replies.items() if len(m[Key.KEY_SHARES]) > 0)
        replies[holder][Key.KEY_SHARES][:, 0] ^= 1

    server, inputs = _drive({Stage.MASKED_INPUT: drop_and_corrupt, Stage.UNMASK: corrupt})
    assert len(server.rejected) == 1 and "mask key" in next(iter(server.rejected.values()))
    ids = [i for i in range(N) if i != 2]
    assert np.abs(server.result() - _expected_sum(inputs, ids)).max() < server.error_bound
