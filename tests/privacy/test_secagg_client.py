"""The SecAgg+ client state machine: every stage transition, and every forged message."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from client.runtime import ClientRuntime
from privacy.secagg import (
    SERVER_ID,
    Payload,
    QuantizationError,
    SecAggConfig,
    SecAggPlusClient,
    SecAggPlusServer,
    SecAggProtocolError,
    Stage,
)
from privacy.secagg.client import IDLE
from privacy.secagg.messages import Key, ints
from protos.codec import Message
from protos.wire import SecAggInstruction
from protos.wire import Stage as WireStage
from tests.privacy.test_secagg_driver import Transcript, make_inputs, new_round, run_round

N, SIZE, ME = 10, 16, 0
STAGES = [str(s) for s in Stage.ordered()]


@pytest.fixture(scope="module")
def recorded() -> tuple[Transcript, Payload, dict[int, np.ndarray]]:
    """Every message of one round of 10 seeded clients, and the setup of the next round."""
    transcript = Transcript()
    server, clients = new_round(N, size=SIZE, round_id=1)
    inputs = make_inputs(N, SIZE, 1.0)
    run_round(server, clients, inputs, transcript=transcript)
    next_server, _ = new_round(N, size=SIZE, round_id=2)
    return transcript, next_server.start()[ME], inputs


def _copy(msg: Payload) -> Payload:
    return {k: v.copy() for k, v in msg.items()}


def _client_after(transcript: Transcript, stage: str, inputs: dict[int, np.ndarray]) -> SecAggPlusClient:
    """A fresh client 0 (same seed as in the recording) that completed `stage`."""
    client = SecAggPlusClient(ME, seed=1000 + ME)
    if stage == IDLE:
        return client
    for s in STAGES[: STAGES.index(stage) + 1]:
        client.handle(_copy(transcript.sent[s][ME]), inputs[ME])
    assert client.stage == stage
    return client


CURRENT = [IDLE, *STAGES]
INCOMING = [(1, s) for s in STAGES] + [(2, s) for s in STAGES]
VALID = {
    (IDLE, (1, Stage.SETUP)),
    (Stage.SETUP, (1, Stage.SHARE_KEYS)),
    (Stage.SHARE_KEYS, (1, Stage.MASKED_INPUT)),
    (Stage.MASKED_INPUT, (1, Stage.UNMASK)),
} | {(cur, (2, Stage.SETUP)) for cur in CURRENT}


@pytest.mark.parametrize(("current", "incoming"), list(itertools.product(CURRENT, INCOMING)))
def test_stage_transition_matrix(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
    current: str,
    incoming: tuple[int, str],
) -> None:
    transcript, next_setup, inputs = recorded
    round_id, stage = incoming
    if round_id == 1:
        msg = _copy(transcript.sent[stage][ME])
    elif stage == Stage.SETUP:
        msg = _copy(next_setup)
    else:  # a later stage of a round the client never set up
        msg = _copy(transcript.sent[stage][ME])
        msg[Key.ROUND] = ints(2)
    client = _client_after(transcript, current, inputs)
    if (current, incoming) in VALID:
        reply = client.handle(msg, inputs[ME])
        assert client.stage == stage
        assert int(reply[Key.ROUND][0]) == round_id
        assert bytes(reply[Key.STAGE]).decode() == stage
        assert int(reply[Key.SENDER][0]) == ME and int(reply[Key.RECIPIENT][0]) == SERVER_ID
    else:
        with pytest.raises(SecAggProtocolError, match=r"round|stage|stale|replayed"):
            client.handle(msg, inputs[ME])
        assert client.stage == current  # a refused message changes nothing


def test_recorded_replies_match_a_fresh_replay(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    """The seeded client is deterministic, so the matrix above replays the real round."""
    transcript, _, inputs = recorded
    client = _client_after(transcript, Stage.SHARE_KEYS, inputs)
    reply = client.handle(_copy(transcript.sent[Stage.MASKED_INPUT][ME]), inputs[ME])
    np.testing.assert_array_equal(reply[Key.MASKED_INPUT], transcript.replies[Stage.MASKED_INPUT][ME][Key.MASKED_INPUT])


def test_replayed_messages_are_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    client = _client_after(transcript, Stage.MASKED_INPUT, inputs)
    # the same masked_input message again must not make the client mask a second time
    with pytest.raises(SecAggProtocolError, match="completed stage masked_input"):
        client.handle(_copy(transcript.sent[Stage.MASKED_INPUT][ME]), inputs[ME])
    with pytest.raises(SecAggProtocolError, match="replayed or stale setup"):
        client.handle(_copy(transcript.sent[Stage.SETUP][ME]))
    client.handle(_copy(transcript.sent[Stage.UNMASK][ME]))
    with pytest.raises(SecAggProtocolError, match="completed stage unmask"):
        client.handle(_copy(transcript.sent[Stage.UNMASK][ME]))


def test_tampered_share_is_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    client = _client_after(transcript, Stage.SHARE_KEYS, inputs)
    good = transcript.sent[Stage.MASKED_INPUT][ME]
    for row, byte in [(0, 0), (0, 30), (len(good[Key.SOURCES]) - 1, 91)]:
        bad = _copy(good)
        bad[Key.CIPHERTEXTS][row, byte] ^= 1
        with pytest.raises(SecAggProtocolError, match="AES-GCM authentication"):
            client.handle(bad, inputs[ME])
        assert client.stage == Stage.SHARE_KEYS
    # a genuine share relabelled as coming from another neighbour fails too
    swapped = _copy(good)
    swapped[Key.CIPHERTEXTS][[0, 1]] = swapped[Key.CIPHERTEXTS][[1, 0]]
    with pytest.raises(SecAggProtocolError, match="AES-GCM authentication"):
        client.handle(swapped, inputs[ME])
    client.handle(_copy(good), inputs[ME])  # the untouched message still works
    assert client.stage == Stage.MASKED_INPUT


def test_share_from_another_round_is_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    """Ciphertexts are bound to their round by the key derivation and the associated data.

    Round 5 below uses the same seeded clients, hence the very same key pairs and
    the same graph as the recording: only the round id differs.
    """
    transcript, _, inputs = recorded
    server = SecAggPlusServer(SecAggConfig(clipping_range=1.0), 5, list(range(N)), SIZE, seed=1)
    clients = {i: SecAggPlusClient(i, seed=1000 + i) for i in range(N)}
    other = Transcript()
    run_round(server, clients, inputs, transcript=other)
    assert np.array_equal(  # same keys as in the recording
        other.replies[Stage.SETUP][ME][Key.ENC_PK], transcript.replies[Stage.SETUP][ME][Key.ENC_PK]
    )
    assert np.array_equal(
        other.sent[Stage.MASKED_INPUT][ME][Key.SOURCES],
        transcript.sent[Stage.MASKED_INPUT][ME][Key.SOURCES],
    )
    client = _client_after(transcript, Stage.SHARE_KEYS, inputs)
    msg = _copy(transcript.sent[Stage.MASKED_INPUT][ME])
    msg[Key.CIPHERTEXTS] = other.sent[Stage.MASKED_INPUT][ME][Key.CIPHERTEXTS].copy()
    with pytest.raises(SecAggProtocolError, match="AES-GCM authentication"):
        client.handle(msg, inputs[ME])


def _non_neighbour(transcript: Transcript) -> int:
    neighbours = set(transcript.sent[Stage.SETUP][ME][Key.NEIGHBOURS].tolist())
    strangers = set(range(N)) - neighbours - {ME}
    assert strangers, "the 10-client graph is not complete"
    return min(strangers)


def test_keys_from_a_non_neighbour_are_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    stranger = _non_neighbour(transcript)
    client = _client_after(transcript, Stage.SETUP, inputs)
    msg = _copy(transcript.sent[Stage.SHARE_KEYS][ME])
    their_keys = transcript.replies[Stage.SETUP][stranger]
    msg[Key.PEERS] = np.append(msg[Key.PEERS], stranger)
    msg[Key.PEER_MASK_PKS] = np.vstack([msg[Key.PEER_MASK_PKS], their_keys[Key.MASK_PK]])
    msg[Key.PEER_ENC_PKS] = np.vstack([msg[Key.PEER_ENC_PKS], their_keys[Key.ENC_PK]])
    with pytest.raises(SecAggProtocolError, match=rf"non-neighbour client\(s\) \[{stranger}\]"):
        client.handle(msg)
    assert client.stage == Stage.SETUP


def test_share_from_a_non_neighbour_is_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    stranger = _non_neighbour(transcript)
    client = _client_after(transcript, Stage.SHARE_KEYS, inputs)
    msg = _copy(transcript.sent[Stage.MASKED_INPUT][ME])
    theirs = transcript.replies[Stage.SHARE_KEYS][stranger]
    msg[Key.SOURCES] = np.append(msg[Key.SOURCES], stranger)
    msg[Key.CIPHERTEXTS] = np.vstack([msg[Key.CIPHERTEXTS], theirs[Key.CIPHERTEXTS][:1]])
    with pytest.raises(SecAggProtocolError, match="non-neighbour"):
        client.handle(msg, inputs[ME])
    assert client.stage == Stage.SHARE_KEYS


def test_unmask_requests_that_would_leak_are_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    good = transcript.sent[Stage.UNMASK][ME]
    other = int(good[Key.INCLUDED][good[Key.INCLUDED] != ME][0])
    cases = {
        "included and dropped": {Key.DROPPED: np.append(good[Key.DROPPED], other)},
        "does not list this client": {Key.INCLUDED: good[Key.INCLUDED][good[Key.INCLUDED] != ME]},
        "holds no shares": {Key.INCLUDED: np.append(good[Key.INCLUDED], _non_neighbour(transcript))},
        "threshold": {Key.INCLUDED: ints([ME, other])},
    }
    for match, change in cases.items():
        client = _client_after(transcript, Stage.MASKED_INPUT, inputs)
        msg = _copy(good)
        msg.update(change)
        with pytest.raises(SecAggProtocolError, match=match):
            client.handle(msg)
        assert client.stage == Stage.MASKED_INPUT


def test_malformed_messages_are_refused(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, _ = recorded
    good = transcript.sent[Stage.SETUP][ME]
    cases: dict[str, Payload] = {
        "not from the server": {**good, Key.SENDER: ints(3)},
        "addressed to client 4": {**good, Key.RECIPIENT: ints(4)},
        "missing header": {k: v for k, v in good.items() if k != Key.ROUND},
        "missing key": {k: v for k, v in good.items() if k != Key.THRESHOLD},
        "unexpected key": {**good, "extra": ints(1)},
        "must be int64": {**good, Key.THRESHOLD: np.array([6], dtype=np.int32)},
        "unknown stage": {**good, Key.STAGE: np.frombuffer(b"launch", dtype=np.uint8)},
        "more than once": {**good, Key.NEIGHBOURS: ints([1, 1, 2, 3, 4, 5])},
        r"threshold 3 must be in \(4, 9\]": {**good, Key.THRESHOLD: ints(3)},
        "would wrap": {**good, Key.LEVELS: ints(2**31)},
        "clipping_range": {**good, Key.CLIPPING_RANGE: np.array([np.inf])},
    }
    for match, msg in cases.items():
        client = SecAggPlusClient(ME, seed=1)
        with pytest.raises(SecAggProtocolError, match=match):
            client.handle(msg)
        assert client.stage == IDLE
    with pytest.raises(SecAggProtocolError, match="payload must be a dict"):
        SecAggPlusClient(ME).handle([1, 2])  # type: ignore[arg-type]


def test_masked_input_needs_a_finite_vector(
    recorded: tuple[Transcript, Payload, dict[int, np.ndarray]],
) -> None:
    transcript, _, inputs = recorded
    msg = transcript.sent[Stage.MASKED_INPUT][ME]
    bad_vectors: list[tuple[object, str]] = [
        (None, "input vector is required"),
        (np.full(SIZE, np.nan, dtype=np.float32), "non-finite"),
        (np.where(np.arange(SIZE) == 3, np.inf, 0).astype(np.float32), "first at index 3"),
        (np.zeros(SIZE + 1, dtype=np.float32), "shape"),
        (np.zeros(SIZE, dtype=np.int64), "float dtype"),
    ]
    for vector, match in bad_vectors:
        client = _client_after(transcript, Stage.SHARE_KEYS, inputs)
        with pytest.raises(QuantizationError, match=match):
            client.handle(_copy(msg), vector)  # type: ignore[arg-type]
        assert client.stage == Stage.SHARE_KEYS


def _to_masked_input(n: int = 5) -> tuple[SecAggPlusServer, dict[int, SecAggPlusClient], dict[int, Payload]]:
    """A round driven up to its masked-input messages (not yet handled)."""
    server, clients = new_round(n, size=SIZE, round_id=1)
    outgoing = server.start()
    while server.stage != Stage.MASKED_INPUT:
        outgoing = server.step({cid: clients[cid].handle(msg) for cid, msg in outgoing.items()})
    return server, clients, outgoing


def test_check_accepts_the_next_message_refuses_the_rest_and_changes_nothing() -> None:
    _, clients, outgoing = _to_masked_input()
    client, message = clients[2], outgoing[2]
    before = (client.state.stage, dict(client.state.seed_shares), dict(client.state.key_shares))
    client.check(message)  # in order: accepted
    assert (client.state.stage, client.state.seed_shares, client.state.key_shares) == before
    stranger = {**_copy(message), Key.SOURCES: ints([99, *message[Key.SOURCES][1:].tolist()])}
    with pytest.raises(SecAggProtocolError, match="non-neighbour"):
        client.check(stranger)
    with pytest.raises(SecAggProtocolError, match="addressed to client 3"):
        client.check(outgoing[3])
    client.handle(message, make_inputs(5, SIZE, 1.0)[2])
    with pytest.raises(SecAggProtocolError, match="completed stage masked_input"):
        client.check(message)  # replayed
    assert client.state.stage == Stage.MASKED_INPUT


def test_a_replayed_masked_input_is_refused_before_the_runtime_trains() -> None:
    """The runtime trains for a masked input only once the SecAgg+ client accepts the message, so a replayed
    one costs no training and no privacy budget (training spends it before the masking could refuse)."""
    _, clients, outgoing = _to_masked_input()
    client = clients[2]
    client.handle(outgoing[2], make_inputs(5, SIZE, 1.0)[2])
    runtime = ClientRuntime(model=torch.nn.Linear(1, 1), spec=None, secagg=client)  # type: ignore[arg-type]
    trained: list[Message] = []
    runtime.train = trained.append  # type: ignore[method-assign,assignment]  # what would have trained
    config = SecAggInstruction(client_index=2, secagg_stage=Stage.MASKED_INPUT, weight_cap=1.0).to_config()
    tensors = {"secagg/" + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outgoing[2].items()}
    reply = runtime.secure_step(Message(round=1, stage=WireStage.SECAGG, config=config, tensors=tensors))
    assert reply.stage == WireStage.ERROR and "completed stage masked_input" in str(reply.config), reply.config
    assert trained == []
    assert runtime.secagg is client and client.state.stage == Stage.MASKED_INPUT
