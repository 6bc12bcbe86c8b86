"""Client side of SecAgg+: one state machine, one method per stage.

The client never opens a connection: `handle` takes the server's message for
the current stage and returns the reply. Every incoming message is checked
before any state changes (header, stage transition, fields, dtypes, shapes,
who the other clients are), so a rejected message leaves the client where it
was. Secrets of a round (keys, self-mask seed, shares held for neighbours) are
dropped once the unmask reply is produced.

Transitions: within a round, only the next stage is accepted (setup ->
share_keys -> masked_input -> unmask). A setup for a newer round is accepted
from any stage (the server abandoned the old round); anything for an older
round, the same stage twice, or a skipped stage is refused, which is what
keeps a replayed message from making the client mask or reveal twice.

Keys ahead. The setup stage only asks a client for two fresh public keys, so a
client hands over the keys of its *next* round with its unmask reply (it keeps
the private halves as ``prekeys``). When the server samples it again it can
skip that client's setup: its share_keys message then carries the setup's
fields too (a "keyed" share_keys), which the client checks like a setup and
answers with the pre-made keys. That saves one of the four message round trips
of every round after a client's first. Pre-made keys serve one round only: a
keyed share_keys consumes them, a setup discards them, and a client without
them refuses a keyed share_keys (the server then counts it as dropped at that
stage, and gives it a full setup next time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy.secagg import crypto
from privacy.secagg.errors import QuantizationError, SecAggProtocolError
from privacy.secagg.graph import share_index
from privacy.secagg.messages import (
    HEADER_KEYS,
    SERVER_ID,
    Key,
    Payload,
    Stage,
    check_fields,
    id_list,
    ints,
    is_keyed_share_keys,
    make,
    raw,
    raw_rows,
    read_header,
    rows,
)
from privacy.secagg.quantize import MODULUS, check_shape, quantize_masked

IDLE = "idle"  # no round started yet

_NEXT: dict[str, Stage | None] = {
    IDLE: Stage.SETUP,
    Stage.SETUP: Stage.SHARE_KEYS,
    Stage.SHARE_KEYS: Stage.MASKED_INPUT,
    Stage.MASKED_INPUT: Stage.UNMASK,
    Stage.UNMASK: None,
}

_I64 = np.dtype(np.int64)
_U8 = np.dtype(np.uint8)
_F64 = np.dtype(np.float64)

_SETUP_FIELDS: dict[str, tuple[np.dtype, tuple[int | None, ...]]] = {
    Key.NUM_CLIENTS: (_I64, (1,)),
    Key.VECTOR_SIZE: (_I64, (1,)),
    Key.NEIGHBOURS: (_I64, (None,)),
    Key.THRESHOLD: (_I64, (1,)),
    Key.CLIPPING_RANGE: (_F64, (1,)),
    Key.LEVELS: (_I64, (1,)),
}


@dataclass
class SecAggClientState:
    """Everything a client remembers, for the current round only (plus the last round id)."""

    stage: str = IDLE
    round_id: int | None = None
    # from setup
    num_clients: int = 0
    vector_size: int = 0
    neighbours: tuple[int, ...] = ()
    threshold: int = 0
    clipping_range: float = 0.0
    levels: int = 0
    mask_key: X25519PrivateKey | None = None
    enc_key: X25519PrivateKey | None = None
    # from share_keys
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (mask pk, enc pk)
    self_mask_seed: bytes = b""
    # from masked_input: shares held per owner (this client's own included)
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)
    # made at unmask for the client's next round, public halves sent to the server (module docstring)
    prekeys: tuple[X25519PrivateKey, X25519PrivateKey] | None = None  # (mask key, encryption key)


class SecAggPlusClient:
    """One client of SecAgg+ rounds; `seed` makes keys and rounding reproducible (tests only)."""

    def __init__(self, client_id: int, seed: int | None = None) -> None:
        if isinstance(client_id, bool) or not isinstance(client_id, int) or not 0 <= client_id < 2**63:
            raise ValueError(f"client_id must be an integer in [0, 2^63) (int64), got {client_id!r}")
        self.client_id = client_id
        self._seeded = seed is not None
        self._rng = np.random.default_rng(seed)
        self.state = SecAggClientState()

    def reindexed(self, client_id: int) -> SecAggPlusClient:
        """This client under the id a new round gives it, keeping what outlives a round (the last round id,
        the pre-made keys); for a keyed share_keys, whose recipient is the client's id in its new round."""
        other = SecAggPlusClient(client_id)
        other._seeded, other._rng = self._seeded, self._rng
        other.state = SecAggClientState(stage=self.state.stage, round_id=self.state.round_id,
                                        prekeys=self.state.prekeys)
        return other

    @property
    def stage(self) -> str:
        """The last stage this client completed ('idle' before its first round)."""
        return self.state.stage

    def handle(self, message: Payload, input_vector: npt.NDArray | None = None) -> Payload:
        """Check `message`, run its stage, return the reply (SecAggProtocolError if refused).

        `input_vector` (float, shape (vector_size,), clipped by the caller) is required
        when the message is the masked_input stage and ignored otherwise.
        """
        round_id, stage, keyed, where = self._accept(message)
        if keyed:
            body = self._keyed_share_keys(message, round_id, where)
        elif stage == Stage.SETUP:
            body = self._setup(message, round_id, where)
        elif stage == Stage.SHARE_KEYS:
            body = self._share_keys(message, where)
        elif stage == Stage.MASKED_INPUT:
            body = self._masked_input(message, input_vector, where)
        else:
            body = self._unmask(message, where)
        self.state.stage = stage
        return make(round_id, Stage(stage), self.client_id, SERVER_ID, **body)

    def check(self, message: Payload) -> None:
        """Raise SecAggProtocolError if :meth:`handle` would refuse `message` before running its stage.

        Its header, addressee and place in the stage order, and at the masked-input stage the senders of the
        shares it relays; not the shares themselves (decrypting them is part of the stage). The runtime asks
        before it trains for a masked input, so a replayed or out-of-order message costs no training and no
        privacy budget. Changes nothing.
        """
        _, stage, keyed, where = self._accept(message)
        if stage == Stage.MASKED_INPUT and not keyed:
            self._share_sources(message, where)

    # ------------------------------------------------------------------ checks

    def _accept(self, message: Payload) -> tuple[int, str, bool, str]:
        """(round, stage, whether a keyed share_keys, where) of a message this client may handle next, or raise."""
        where = f"client {self.client_id}"
        round_id, stage, sender, recipient = read_header(message, where)
        where = f"client {self.client_id}, round {round_id}, stage {stage}"
        if sender != SERVER_ID:
            raise SecAggProtocolError(f"{where}: message from {sender}, not from the server")
        if recipient != self.client_id:
            raise SecAggProtocolError(f"{where}: message addressed to client {recipient}")
        keyed = is_keyed_share_keys(stage, message)
        self._check_transition(round_id, Stage.SETUP if keyed else Stage(stage), where)
        return round_id, stage, keyed, where

    def _share_sources(self, msg: Payload, where: str) -> list[int]:
        """The clients whose shares a masked-input message relays, checked against this round's key sharing."""
        st = self.state
        check_fields(
            msg,
            {
                Key.SOURCES: (_I64, (None,)),
                Key.CIPHERTEXTS: (_U8, (None, crypto.CIPHERTEXT_BYTES)),
            },
            where,
        )
        sources = id_list(msg[Key.SOURCES], Key.SOURCES, where)
        if len(sources) != msg[Key.CIPHERTEXTS].shape[0]:
            raise SecAggProtocolError(f"{where}: sources and ciphertexts differ in length")
        strangers = sorted(set(sources) - set(st.neighbours))
        if strangers:
            raise SecAggProtocolError(f"{where}: shares from non-neighbour client(s) {strangers}")
        unknown = sorted(set(sources) - set(st.peers))
        if unknown:
            raise SecAggProtocolError(f"{where}: shares from client(s) {unknown} that were not in key sharing")
        if len(sources) + 1 < st.threshold:
            raise SecAggProtocolError(
                f"{where}: shares from only {len(sources)} neighbours, threshold needs "
                f"{st.threshold - 1} besides this client"
            )
        return sources

    def _check_transition(self, round_id: int, stage: Stage, where: str) -> None:
        st = self.state
        if stage == Stage.SETUP:
            if st.round_id is not None and round_id <= st.round_id:
                raise SecAggProtocolError(f"{where}: replayed or stale setup (client already saw round {st.round_id})")
            return
        if round_id != st.round_id:
            raise SecAggProtocolError(
                f"{where}: message for round {round_id}, but the client is in round {st.round_id}"
            )
        expected = _NEXT[st.stage]
        if stage != expected:
            raise SecAggProtocolError(
                f"{where}: client completed stage {st.stage}, expects "
                f"{expected or 'a setup for a new round'}, got {stage}"
            )

    # ------------------------------------------------------------------ stages

    def _setup(self, msg: Payload, round_id: int, where: str,
               keys: tuple[X25519PrivateKey, X25519PrivateKey] | None = None) -> dict[str, npt.NDArray]:
        """Check the round's configuration and take on its keys: fresh ones, or ``keys`` made ahead."""
        check_fields(msg, _SETUP_FIELDS, where)
        n = int(msg[Key.NUM_CLIENTS][0])
        size = int(msg[Key.VECTOR_SIZE][0])
        neighbours = id_list(msg[Key.NEIGHBOURS], Key.NEIGHBOURS, where)
        t = int(msg[Key.THRESHOLD][0])
        c = float(msg[Key.CLIPPING_RANGE][0])
        levels = int(msg[Key.LEVELS][0])
        if n < 2:
            raise SecAggProtocolError(f"{where}: secure aggregation needs >= 2 clients, got {n}")
        if size < 1:
            raise SecAggProtocolError(f"{where}: vector_size must be >= 1, got {size}")
        if self.client_id in neighbours or not neighbours or len(neighbours) > n - 1:
            raise SecAggProtocolError(f"{where}: neighbour list must be 1..{n - 1} other clients, got {neighbours}")
        if min(neighbours) < 0:
            raise SecAggProtocolError(f"{where}: negative client id in neighbour list")
        members = len(neighbours) + 1
        if not members // 2 < t <= members:
            # t <= members/2 would let the server collect both secrets of a client
            raise SecAggProtocolError(
                f"{where}: threshold {t} must be in ({members // 2}, {members}] for a neighbourhood of {members}"
            )
        if not (np.isfinite(c) and c > 0):
            raise SecAggProtocolError(f"{where}: clipping_range must be finite and > 0, got {c}")
        if not (levels >= 1 and levels * n < MODULUS):
            raise SecAggProtocolError(f"{where}: quantization levels {levels} x {n} clients would wrap modulo 2^32")
        mask_key, enc_key = keys or self._new_keys()
        self.state = SecAggClientState(
            stage=IDLE,
            round_id=round_id,
            num_clients=n,
            vector_size=size,
            neighbours=tuple(sorted(neighbours)),
            threshold=t,
            clipping_range=c,
            levels=levels,
            mask_key=mask_key,
            enc_key=enc_key,
        )
        return {
            Key.MASK_PK: raw(crypto.public_bytes(mask_key)),
            Key.ENC_PK: raw(crypto.public_bytes(enc_key)),
        }

    def _keyed_share_keys(self, msg: Payload, round_id: int, where: str) -> dict[str, npt.NDArray]:
        """A share_keys that also sets the round up, with the keys this client made ahead (module docstring).

        All or nothing: a refused message leaves the client as it was, pre-made keys included."""
        if self.state.prekeys is None:
            raise SecAggProtocolError(f"{where}: a share_keys for a round set up with keys made ahead, but this "
                                      "client holds none (it restarted, or already used them)")
        header = {k: v for k, v in msg.items() if k in HEADER_KEYS}
        setup = {**header, **{k: v for k, v in msg.items() if k in _SETUP_FIELDS}}
        sharing = {k: v for k, v in msg.items() if k not in _SETUP_FIELDS}
        before = self.state
        try:
            self._setup(setup, round_id, where, keys=before.prekeys)  # the new state holds no pre-made keys
            return self._share_keys(sharing, where)
        except BaseException:
            self.state = before
            raise

    def _share_keys(self, msg: Payload, where: str) -> dict[str, npt.NDArray]:
        st = self.state
        check_fields(
            msg,
            {
                Key.PEERS: (_I64, (None,)),
                Key.PEER_MASK_PKS: (_U8, (None, crypto.KEY_BYTES)),
                Key.PEER_ENC_PKS: (_U8, (None, crypto.KEY_BYTES)),
            },
            where,
        )
        peers = id_list(msg[Key.PEERS], Key.PEERS, where)
        mask_pks, enc_pks = rows(msg[Key.PEER_MASK_PKS]), rows(msg[Key.PEER_ENC_PKS])
        if not len(peers) == len(mask_pks) == len(enc_pks):
            raise SecAggProtocolError(f"{where}: peers and public-key lists differ in length")
        strangers = sorted(set(peers) - set(st.neighbours))
        if strangers:
            raise SecAggProtocolError(f"{where}: keys from non-neighbour client(s) {strangers}")
        if len(peers) + 1 < st.threshold:
            raise SecAggProtocolError(
                f"{where}: only {len(peers)} neighbours left, threshold needs {st.threshold - 1} besides this client"
            )
        assert st.mask_key is not None and st.enc_key is not None
        own = {crypto.public_bytes(st.mask_key), crypto.public_bytes(st.enc_key)}
        all_pks = mask_pks + enc_pks
        if len(set(all_pks)) != len(all_pks) or own & set(all_pks):
            raise SecAggProtocolError(f"{where}: public keys are not all distinct")
        try:
            for pk in all_pks:
                crypto.public_key_from_bytes(pk)
        except ValueError as err:
            raise SecAggProtocolError(f"{where}: invalid X25519 public key ({err})") from None

        seed = self._entropy(crypto.SEED_BYTES) or os.urandom(crypto.SEED_BYTES)
        members = len(st.neighbours) + 1
        seed_shares = crypto.split_secret(seed, st.threshold, members)
        key_shares = crypto.split_secret(crypto.private_bytes(st.mask_key), st.threshold, members)
        me = self.client_id
        ciphertexts = []
        for peer, enc_pk in zip(peers, enc_pks, strict=True):
            idx = share_index(me, peer, st.neighbours) - 1
            key = crypto.agree(st.enc_key, enc_pk, "share-encryption", self._round(), me, peer)
            ciphertexts.append(crypto.encrypt_shares(key, self._round(), me, peer, seed_shares[idx], key_shares[idx]))
        own_idx = share_index(me, me, st.neighbours) - 1
        st.peers = {p: (m, e) for p, m, e in zip(peers, mask_pks, enc_pks, strict=True)}
        st.self_mask_seed = seed
        st.seed_shares = {me: seed_shares[own_idx]}
        st.key_shares = {me: key_shares[own_idx]}
        return {
            Key.DESTINATIONS: ints(peers),
            Key.CIPHERTEXTS: raw_rows(ciphertexts, crypto.CIPHERTEXT_BYTES),
            Key.SEED_COMMITMENT: raw(crypto.commit_seed(seed, self._round(), me)),
        }

    def _masked_input(self, msg: Payload, input_vector: npt.NDArray | None, where: str) -> dict[str, npt.NDArray]:
        st = self.state
        sources = self._share_sources(msg, where)
        if input_vector is None:
            raise QuantizationError(f"{where}: the input vector is required at stage {Stage.MASKED_INPUT}")
        check_shape(input_vector, st.vector_size)  # its values are checked finite while they are quantized
        assert st.enc_key is not None and st.mask_key is not None
        me, r = self.client_id, self._round()
        seed_shares, key_shares = dict(st.seed_shares), dict(st.key_shares)
        for src, ct in zip(sources, rows(msg[Key.CIPHERTEXTS]), strict=True):
            key = crypto.agree(st.enc_key, st.peers[src][1], "share-encryption", r, me, src)
            seed_shares[src], key_shares[src] = crypto.decrypt_shares(key, r, src, me, ct)

        # quantized input + self mask + the pairwise masks (added toward higher ids, subtracted toward lower),
        # mod 2^32, built block by block in the one output array
        add: list[bytes] = [st.self_mask_seed]
        subtract: list[bytes] = []
        for src in sources:
            pair_seed = crypto.pair_mask_seed(st.mask_key, st.peers[src][0], r, me, src)
            (add if me < src else subtract).append(pair_seed)
        masked = quantize_masked(input_vector, st.clipping_range, st.levels, self._rng, add, subtract)
        st.seed_shares, st.key_shares = seed_shares, key_shares
        return {Key.MASKED_INPUT: masked}

    def _unmask(self, msg: Payload, where: str) -> dict[str, npt.NDArray]:
        st = self.state
        check_fields(msg, {Key.INCLUDED: (_I64, (None,)), Key.DROPPED: (_I64, (None,))}, where)
        included = id_list(msg[Key.INCLUDED], Key.INCLUDED, where)
        dropped = id_list(msg[Key.DROPPED], Key.DROPPED, where)
        both = sorted(set(included) & set(dropped))
        if both:
            # revealing both shares of one client would let the server unmask its input
            raise SecAggProtocolError(f"{where}: client(s) {both} listed as included and dropped")
        if self.client_id not in included:
            raise SecAggProtocolError(f"{where}: the server does not list this client as included")
        unknown = sorted((set(included) | set(dropped)) - set(st.seed_shares))
        if unknown:
            raise SecAggProtocolError(f"{where}: this client holds no shares of {unknown}")
        if len(included) < st.threshold:
            raise SecAggProtocolError(f"{where}: only {len(included)} neighbours included, threshold is {st.threshold}")
        reply: dict[str, npt.NDArray] = {
            Key.SEED_SHARE_OWNERS: ints(included).reshape(-1),
            Key.SEED_SHARES: raw_rows([st.seed_shares[i] for i in included], crypto.SHARE_BYTES),
            Key.KEY_SHARE_OWNERS: ints(dropped).reshape(-1),
            Key.KEY_SHARES: raw_rows([st.key_shares[i] for i in dropped], 2 * crypto.SHARE_BYTES),
        }
        # the round's secrets are no longer needed; keep only what transitions need, and the keys of the next
        # round this client is sampled in (module docstring)
        mask_key, enc_key = self._new_keys()
        self.state = SecAggClientState(stage=st.stage, round_id=st.round_id, prekeys=(mask_key, enc_key))
        reply[Key.NEXT_MASK_PK] = raw(crypto.public_bytes(mask_key))
        reply[Key.NEXT_ENC_PK] = raw(crypto.public_bytes(enc_key))
        return reply

    # ------------------------------------------------------------------ helpers

    def _round(self) -> int:
        assert self.state.round_id is not None, "stage methods run only after setup"
        return self.state.round_id

    def _new_keys(self) -> tuple[X25519PrivateKey, X25519PrivateKey]:
        """A fresh (mask key, encryption key) pair."""
        return crypto.new_private_key(self._entropy(32)), crypto.new_private_key(self._entropy(32))

    def _entropy(self, nbytes: int) -> bytes | None:
        """Seeded bytes for reproducible runs, None (= use the OS) otherwise."""
        return self._rng.bytes(nbytes) if self._seeded else None
