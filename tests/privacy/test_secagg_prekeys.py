"""SecAgg+ rounds set up with keys made ahead: the keys a client sends with its unmask reply serve its next
round in place of a setup message (privacy/secagg/prekeys.py, client.py "Keys ahead")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.runtime import ClientRuntime
from privacy.secagg import SecAggConfig, SecAggPlusClient, SecAggPlusServer, SecAggProtocolError, Stage, crypto
from privacy.secagg.messages import Key, read_header
from privacy.secagg.prekeys import offered_keys, usable_prekeys
from protos.codec import Message
from protos.wire import SecAggInstruction
from protos.wire import Stage as WireStage
from tests.privacy.test_secagg_driver import Transcript, make_inputs, new_round, run_round

SIZE = 40


def _first_round(n: int) -> tuple[SecAggPlusServer, dict[int, SecAggPlusClient]]:
    server, clients = new_round(n, size=SIZE, round_id=1)
    run_round(server, clients, make_inputs(n, SIZE, 1.0, seed=1))
    return server, clients


def _next_round(round_id: int, members: list[int], size: int = SIZE) -> SecAggPlusServer:
    return SecAggPlusServer(SecAggConfig(clipping_range=1.0), round_id, members, size, seed=round_id)


def _assert_sum(server: SecAggPlusServer, inputs: dict[int, np.ndarray]) -> None:
    plain = sum(inputs[c].astype(np.float64) for c in server.included_clients)
    assert np.max(np.abs(server.result() - plain)) <= server.error_bound + 1e-9


def test_every_client_that_unmasks_offers_distinct_keys_for_its_next_round() -> None:
    server, clients = _first_round(8)
    assert sorted(server.next_keys) == list(range(8))
    keys = [k for pair in server.next_keys.values() for k in pair]
    assert len(set(keys)) == 16
    for cid, client in clients.items():  # the client holds the private halves of what it offered
        assert client.state.prekeys is not None
        mask, enc = client.state.prekeys
        assert (crypto.public_bytes(mask), crypto.public_bytes(enc)) == server.next_keys[cid]


def test_a_round_keyed_ahead_has_no_setup_and_sums_like_plain_with_dropouts() -> None:
    """Round 2 over the first round's clients under new ids (the engine numbers each round's sample anew):
    the first messages are share_keys carrying the setup's fields, and with a client dropping at masked
    input and one at unmask the sum is still the plain sum of the included inputs."""
    n = 12
    first, clients = _first_round(n)
    renumber = {old: (old * 5) % n for old in range(n)}  # a permutation: each client's id in round 2
    again = {renumber[old]: client.reindexed(renumber[old]) for old, client in clients.items()}
    prekeys = {renumber[old]: keys for old, keys in first.next_keys.items()}
    server = _next_round(2, list(range(n)))
    inputs = make_inputs(n, SIZE, 1.0, seed=2)
    transcript = Transcript()
    run_round(server, again, inputs, drop_at={Stage.MASKED_INPUT: {3}, Stage.UNMASK: {7}},
              transcript=transcript, prekeys=prekeys)
    assert Stage.SETUP not in transcript.sent and server.keyed == set(range(n))
    first_messages = transcript.sent[Stage.SHARE_KEYS]
    assert all(Key.NUM_CLIENTS in msg and Key.PEERS in msg for msg in first_messages.values())
    assert 3 not in server.included_clients and 7 in server.included_clients
    _assert_sum(server, inputs)
    assert all(client.state.prekeys is not None for cid, client in again.items() if cid in server.next_keys)


def test_a_round_with_some_clients_keyed_sets_up_only_the_others() -> None:
    first, clients = _first_round(6)
    clients[6] = SecAggPlusClient(6, seed=7)  # joins in round 2: no keys made ahead
    prekeys = dict(first.next_keys)
    server = _next_round(2, list(range(7)))
    inputs = make_inputs(7, SIZE, 1.0, seed=3)
    transcript = Transcript()
    run_round(server, clients, inputs, transcript=transcript, prekeys=prekeys)
    assert sorted(transcript.sent[Stage.SETUP]) == [6]
    shared = transcript.sent[Stage.SHARE_KEYS]
    assert [cid for cid, msg in shared.items() if Key.NUM_CLIENTS in msg] == list(range(6))
    _assert_sum(server, inputs)


def test_keys_made_ahead_serve_one_round_and_a_refused_message_keeps_them() -> None:
    first, clients = _first_round(6)
    server = _next_round(2, list(range(6)))
    outgoing = server.start(dict(first.next_keys))
    client = clients[0]
    message = outgoing[0]
    bad = {**message, Key.THRESHOLD: np.array([1], dtype=np.int64)}  # below the neighbourhood's majority
    with pytest.raises(SecAggProtocolError, match="threshold"):
        client.handle(bad)
    assert client.state.prekeys is not None and client.state.round_id == 1  # as it was
    reply = client.handle(message)
    assert read_header(reply, "reply")[1] == Stage.SHARE_KEYS and client.state.prekeys is None
    with pytest.raises(SecAggProtocolError, match="replayed or stale"):
        client.handle(message)  # the same message again
    later = _next_round(3, list(range(6))).start(dict(first.next_keys))
    with pytest.raises(SecAggProtocolError, match="holds none"):
        client.handle(later[0])  # the server reuses keys already spent


def test_a_setup_discards_keys_made_ahead() -> None:
    _, clients = _first_round(6)
    server = _next_round(2, list(range(6)))
    outgoing = server.start()  # the server lost the keys (say it restarted): a full setup
    clients[2].handle(outgoing[2])
    assert clients[2].state.prekeys is None


def test_unusable_keys_get_a_setup_instead() -> None:
    first, _ = _first_round(6)
    keys = dict(first.next_keys)
    keys[1] = (keys[0][0], keys[1][1])  # shares a key with client 0: neither pair is used
    keys[2] = (keys[2][0], keys[2][0])  # the same key twice
    keys[3] = (b"short", keys[3][1])
    keys[9] = keys.pop(4)  # not in the round
    usable = usable_prekeys(keys, list(range(6)))
    assert sorted(usable) == [5]
    server = _next_round(2, list(range(6)))
    assert sorted(server.start(keys)) == [0, 1, 2, 3, 4]  # setups; 5 waits for its keyed share_keys
    assert server.keyed == {5}


def test_a_keyed_message_refused_after_its_setup_checks_leaves_the_client_as_it_was() -> None:
    """The setup half passes and the sharing half is refused: the state the setup half already replaced,
    and the keys made ahead, come back."""
    first, clients = _first_round(6)
    message = _next_round(2, list(range(6))).start(dict(first.next_keys))[0]
    client, before = clients[0], clients[0].state
    bad = {**message, Key.PEER_ENC_PKS: message[Key.PEER_MASK_PKS].copy()}  # the same keys twice
    with pytest.raises(SecAggProtocolError, match="not all distinct"):
        client.handle(bad)
    assert client.state is before and client.state.prekeys is not None and client.state.stage == Stage.UNMASK
    client.handle(message)
    assert client.state.stage == Stage.SHARE_KEYS and client.state.round_id == 2


def test_a_keyed_message_for_an_older_round_is_refused_while_keys_are_held() -> None:
    first, clients = _first_round(6)
    stale = SecAggPlusServer(SecAggConfig(clipping_range=1.0), 1, list(range(6)), SIZE, seed=5)
    message = stale.start(dict(first.next_keys))[0]
    with pytest.raises(SecAggProtocolError, match="replayed or stale"):
        clients[0].handle(message)
    assert clients[0].state.prekeys is not None


def test_a_setup_client_cannot_reuse_a_key_made_ahead_by_another() -> None:
    first, clients = _first_round(6)
    clients[6] = SecAggPlusClient(6, seed=7)
    server = _next_round(2, list(range(7)))
    outgoing = server.start({cid: keys for cid, keys in first.next_keys.items() if cid != 5})
    assert sorted(outgoing) == [5, 6]
    replies = {cid: clients[cid].handle(msg) for cid, msg in outgoing.items()}
    replies[6] = {**replies[6], Key.MASK_PK: np.frombuffer(first.next_keys[0][0], dtype=np.uint8).copy()}
    server.step(replies)
    assert "reused a public key" in server.rejected[6] and 5 not in server.rejected


def test_low_order_keys_are_never_used() -> None:
    """X25519 parses any 32 bytes, but no secret can be agreed with a low-order point: every neighbour of a
    client offering one would fail at key sharing. Offered ahead, a round never uses it (that client gets a
    setup); in a setup reply, it is refused."""
    zero, one = bytes(32), (1).to_bytes(32, "little")
    assert not crypto.is_usable_public_key(zero) and not crypto.is_usable_public_key(one)
    first, clients = _first_round(6)
    reply = {Key.NEXT_MASK_PK: np.frombuffer(zero, dtype=np.uint8).copy(),
             Key.NEXT_ENC_PK: np.frombuffer(first.next_keys[0][1], dtype=np.uint8).copy()}
    offered = offered_keys(reply)
    assert offered is not None  # its form is right: the round that would rely on it checks the point
    keys = {**first.next_keys, 0: offered}
    assert sorted(usable_prekeys(keys, list(range(6)))) == [1, 2, 3, 4, 5]
    starting = _next_round(2, list(range(6)))
    assert sorted(starting.start(keys)) == [0] and starting.keyed == {1, 2, 3, 4, 5}
    server = _next_round(2, list(range(6)))
    outgoing = server.start()
    replies = {cid: clients[cid].handle(msg) for cid, msg in outgoing.items()}
    replies[3] = {**replies[3], Key.ENC_PK: np.frombuffer(one, dtype=np.uint8).copy()}
    server.step(replies)
    assert "low-order" in server.rejected[3]


def test_a_runtime_keeps_its_round_when_a_keyed_message_comes_twice() -> None:
    """The runtime takes on the client under its new id only once the keyed message is accepted: the same
    message delivered again is refused and the round in progress (keys, neighbours, shares) is kept."""
    first, clients = _first_round(6)
    runtime = ClientRuntime(model=torch.nn.Linear(1, 1), spec=None, secagg=clients[4])  # type: ignore[arg-type]
    server = _next_round(2, list(range(6)))
    payload = server.start(dict(first.next_keys))[4]
    tensors = {"secagg/" + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in payload.items()}
    config = SecAggInstruction(client_index=4, secagg_stage=Stage.SHARE_KEYS, weight_cap=1.0).to_config()
    message = Message(round=2, stage=WireStage.SECAGG, config=config, tensors=tensors)
    assert runtime.secure_step(message).stage == WireStage.SECAGG
    accepted = runtime.secagg
    assert accepted is not None and accepted.state.stage == Stage.SHARE_KEYS and accepted.state.peers
    assert runtime.secure_step(message).stage == WireStage.ERROR
    assert runtime.secagg is accepted and accepted.state.stage == Stage.SHARE_KEYS and accepted.state.self_mask_seed
