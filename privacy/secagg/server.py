"""Server side of SecAgg+: a state machine the round engine drives.

The driver calls `start()`, delivers the returned messages, collects the
replies (a missing id is a dropped client) and passes them to `step()` until
`done`; `result()` is then the float64 sum over `included_clients`. The server
only ever adds masked vectors into one running sum, so it never holds an
individual unmasked input.

A reply that fails any check (wrong round, stage, sender, recipient, keys,
dtypes, shapes, or content such as shares for the wrong clients) is rejected:
its sender is treated as dropped and the reason is kept in `rejected`, so one
faulty client cannot stop the round. The round aborts (SecAggAborted) only
when some neighbourhood falls below the threshold, i.e. when a needed secret
could no longer be reconstructed.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import numpy as np
import numpy.typing as npt

from privacy.secagg import crypto
from privacy.secagg.config import SecAggConfig
from privacy.secagg.errors import SecAggAborted, SecAggError, SecAggProtocolError
from privacy.secagg.graph import (
    build_graph,
    effective_neighbourhood_size,
    threshold_count,
)
from privacy.secagg.messages import (
    SERVER_ID,
    Key,
    Payload,
    Stage,
    check_fields,
    id_list,
    ints,
    make,
    raw_rows,
    read_header,
    rows,
)
from privacy.secagg.prekeys import KeyPair, offered_keys, usable_prekeys
from privacy.secagg.quantize import dequantize_sum, error_bound, levels_for
from privacy.secagg.reconstruct import Wanted, reconstruct, reconstruct_all

INIT = "init"
DONE = "done"
ABORTED = "aborted"

_I64 = np.dtype(np.int64)
_U8 = np.dtype(np.uint8)
_U32 = np.dtype(np.uint32)


def _is_id(value: object) -> bool:
    """Ids and round numbers travel as int64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


class SecAggPlusServer:
    """One SecAgg+ round over `client_ids` summing vectors of `vector_size` floats."""

    def __init__(
        self,
        config: SecAggConfig,
        round_id: int,
        client_ids: list[int],
        vector_size: int,
        seed: int | None = None,
    ) -> None:
        if not _is_id(round_id):
            raise ValueError(f"round_id must be an integer in [0, 2^63), got {round_id!r}")
        ids = list(client_ids)
        if not all(_is_id(c) for c in ids):
            raise ValueError("client_ids must be non-negative integers below 2^63 (int64)")
        if len(set(ids)) != len(ids) or len(ids) < 2:
            raise ValueError(f"client_ids must be >= 2 distinct ids, got {len(ids)} ids")
        if isinstance(vector_size, bool) or not isinstance(vector_size, int) or vector_size < 1:
            raise ValueError(f"vector_size must be a positive integer, got {vector_size!r}")
        self.config = config
        self.round_id = round_id
        self.client_ids = sorted(ids)
        self.vector_size = vector_size
        n = len(ids)
        self.neighbourhood_size = effective_neighbourhood_size(n, config.neighbourhood_size)
        self.threshold = threshold_count(config.threshold, self.neighbourhood_size)
        self.levels = levels_for(n)
        rng = random.Random(seed if seed is not None else secrets.randbits(64))
        self.neighbours = build_graph(ids, self.neighbourhood_size, rng)
        self.stage: str = INIT
        self.rejected: dict[int, str] = {}
        self._expected: dict[int, Payload] = {}  # recipient -> message awaiting its reply
        self._alive: set[int] = set(ids)
        self._public_keys: dict[int, KeyPair] = {}  # id -> (mask pk, enc pk)
        self.keyed: set[int] = set()  # clients whose keys were made ahead (no setup message; see start)
        #: keys for their next round that clients sent with their unmask replies (prekeys.py)
        self.next_keys: dict[int, KeyPair] = {}
        self._shared: set[int] = set()
        self._commitments: dict[int, bytes] = {}
        self._forward: dict[int, list[tuple[int, bytes]]] = {}
        self._held: dict[int, set[int]] = {}  # holder -> owners whose shares it holds
        self._sum: npt.NDArray[np.uint32] | None = None
        self._included: list[int] = []
        self._result: npt.NDArray[np.float64] | None = None
        #: rebuild the secrets at unmask in one batch (crypto.combine_secrets); False: one
        #: pycryptodome Shamir.combine per secret, the earlier path, kept as a reference
        self.batch_reconstruction = True

    # ------------------------------------------------------------------ driver API

    @property
    def done(self) -> bool:
        """True once the sum is unmasked."""
        return self.stage == DONE

    @property
    def included_clients(self) -> list[int]:
        """Clients whose masked input is in the sum (sorted)."""
        return list(self._included)

    @property
    def error_bound(self) -> float:
        """Bound on |result - exact float sum| per coordinate, for the included clients."""
        return error_bound(len(self._included) or len(self.client_ids), self.config.clipping_range, self.levels)

    def start(self, prekeys: Mapping[int, KeyPair] | None = None) -> dict[int, Payload]:
        """The first messages: a setup (configuration and neighbour list) for every client, except those whose
        keys ``prekeys`` holds (made ahead, see prekeys.py), whose setup rides on their share_keys message.
        When every client's keys are there, these are already the share_keys messages."""
        if self.stage != INIT:
            raise SecAggError(f"round {self.round_id}: start() called twice")
        self.stage = Stage.SETUP
        self._public_keys = usable_prekeys(prekeys or {}, self.client_ids)
        self.keyed = set(self._public_keys)
        unkeyed = [cid for cid in self.client_ids if cid not in self.keyed]
        if not unkeyed:
            return self._send(self._after_setup({}))
        return self._send({cid: self._message(cid, **self._setup_fields(cid)) for cid in unkeyed})

    def _setup_fields(self, cid: int) -> dict[str, npt.NDArray]:
        """What a setup tells client ``cid``: the round's configuration and its neighbours."""
        return {
            Key.NUM_CLIENTS: ints(len(self.client_ids)),
            Key.VECTOR_SIZE: ints(self.vector_size),
            Key.NEIGHBOURS: ints(self.neighbours[cid]).reshape(-1),
            Key.THRESHOLD: ints(self.threshold),
            Key.CLIPPING_RANGE: np.array([self.config.clipping_range], dtype=np.float64),
            Key.LEVELS: ints(self.levels),
        }

    def step(self, replies: dict[int, Payload]) -> dict[int, Payload]:
        """Consume the replies to the last messages; return the next ones ({} when done)."""
        if self.stage in (INIT, DONE, ABORTED):
            raise SecAggError(f"round {self.round_id}: step() called in state {self.stage}")
        valid = self._validate(replies)
        try:
            if self.stage == Stage.SETUP:
                return self._send(self._after_setup(valid))
            if self.stage == Stage.SHARE_KEYS:
                return self._send(self._after_share_keys(valid))
            if self.stage == Stage.MASKED_INPUT:
                return self._send(self._after_masked_input(valid))
            self._after_unmask(valid)
            self.stage = DONE
            self._expected = {}
            return {}
        except SecAggAborted:
            self.stage = ABORTED
            self._sum = None
            raise

    def result(self) -> npt.NDArray[np.float64]:
        """Float64 sum of the included clients' inputs (exact up to quantization error)."""
        if self._result is None:
            raise SecAggError(f"round {self.round_id}: no result (stage {self.stage})")
        return self._result

    # ------------------------------------------------------------------ stages

    def _after_setup(self, replies: dict[int, Payload]) -> dict[int, Payload]:
        seen: set[bytes] = {key for pair in self._public_keys.values() for key in pair}  # keys made ahead
        for cid, msg in sorted(replies.items()):
            try:
                check_fields(
                    msg,
                    {
                        Key.MASK_PK: (_U8, (crypto.KEY_BYTES,)),
                        Key.ENC_PK: (_U8, (crypto.KEY_BYTES,)),
                    },
                    f"setup reply of client {cid}",
                )
                mask_pk, enc_pk = msg[Key.MASK_PK].tobytes(), msg[Key.ENC_PK].tobytes()
                if mask_pk == enc_pk or {mask_pk, enc_pk} & seen:
                    raise SecAggProtocolError(f"client {cid} reused a public key")
                if not (crypto.is_usable_public_key(mask_pk) and crypto.is_usable_public_key(enc_pk)):
                    # its neighbours could agree no secret with it and would all fail at key sharing
                    raise SecAggProtocolError(f"client {cid} sent a low-order public key")
            except SecAggProtocolError as err:
                self._reject(cid, str(err))
                continue
            seen |= {mask_pk, enc_pk}
            self._public_keys[cid] = (mask_pk, enc_pk)
        self._alive = set(self._public_keys)
        self._check_neighbourhoods(self._alive, self._alive, "after setup")
        self.stage = Stage.SHARE_KEYS
        out = {}
        for cid in sorted(self._alive):
            peers = sorted(set(self.neighbours[cid]) & self._alive)
            out[cid] = self._message(
                cid,
                **(self._setup_fields(cid) if cid in self.keyed else {}),
                peers=ints(peers).reshape(-1),
                peer_mask_public_keys=raw_rows([self._public_keys[p][0] for p in peers], crypto.KEY_BYTES),
                peer_encryption_public_keys=raw_rows([self._public_keys[p][1] for p in peers], crypto.KEY_BYTES),
            )
        return out

    def _after_share_keys(self, replies: dict[int, Payload]) -> dict[int, Payload]:
        sent: dict[int, list[tuple[int, bytes]]] = {}
        for cid, msg in sorted(replies.items()):
            where = f"share_keys reply of client {cid}"
            try:
                check_fields(
                    msg,
                    {
                        Key.DESTINATIONS: (_I64, (None,)),
                        Key.CIPHERTEXTS: (_U8, (None, crypto.CIPHERTEXT_BYTES)),
                        Key.SEED_COMMITMENT: (_U8, (32,)),
                    },
                    where,
                )
                dsts = id_list(msg[Key.DESTINATIONS], Key.DESTINATIONS, where)
                peers = set(self._expected[cid][Key.PEERS].tolist())
                if set(dsts) != peers or len(dsts) != msg[Key.CIPHERTEXTS].shape[0]:
                    raise SecAggProtocolError(f"{where}: shares not addressed to exactly its peers")
            except SecAggProtocolError as err:
                self._reject(cid, str(err))
                continue
            sent[cid] = list(zip(dsts, rows(msg[Key.CIPHERTEXTS]), strict=True))
            self._commitments[cid] = msg[Key.SEED_COMMITMENT].tobytes()
        self._alive = set(sent)
        self._shared = set(sent)
        self._check_neighbourhoods(self._alive, self._alive, "after key sharing")
        self._forward = {cid: [] for cid in self._alive}
        for src, bundle in sorted(sent.items()):
            for dst, ct in bundle:
                if dst in self._forward:
                    self._forward[dst].append((src, ct))
        self.stage = Stage.MASKED_INPUT
        out = {}
        for cid in sorted(self._alive):
            fwd = self._forward[cid]
            self._held[cid] = {cid} | {src for src, _ in fwd}
            out[cid] = self._message(
                cid,
                sources=ints([src for src, _ in fwd]).reshape(-1),
                ciphertexts=raw_rows([ct for _, ct in fwd], crypto.CIPHERTEXT_BYTES),
            )
        self._forward = {}
        return out

    def _after_masked_input(self, replies: dict[int, Payload]) -> dict[int, Payload]:
        total = np.zeros(self.vector_size, dtype=np.uint32)
        included = []
        for cid, msg in sorted(replies.items()):
            try:
                check_fields(
                    msg,
                    {Key.MASKED_INPUT: (_U32, (self.vector_size,))},
                    f"masked_input reply of client {cid}",
                )
            except SecAggProtocolError as err:
                self._reject(cid, str(err))
                continue
            total += msg[Key.MASKED_INPUT]  # uint32 arithmetic wraps modulo 2^32
            included.append(cid)
        self._sum = total
        self._included = included
        self._alive = set(included)
        self._check_neighbourhoods(self._shared, self._alive, "after masked input")
        self.stage = Stage.UNMASK
        dropped = self._shared - self._alive
        return {
            cid: self._message(
                cid,
                included=ints(sorted(self._held[cid] & self._alive)).reshape(-1),
                dropped=ints(sorted(self._held[cid] & dropped)).reshape(-1),
            )
            for cid in included
        }

    def _after_unmask(self, replies: dict[int, Payload]) -> None:
        # owner -> [(holder, share)]
        seed_shares: dict[int, list[tuple[int, bytes]]] = {c: [] for c in self._shared}
        key_shares: dict[int, list[tuple[int, bytes]]] = {c: [] for c in self._shared}
        for holder, msg in sorted(replies.items()):
            where = f"unmask reply of client {holder}"
            try:
                check_fields(
                    msg,
                    {
                        Key.SEED_SHARE_OWNERS: (_I64, (None,)),
                        Key.SEED_SHARES: (_U8, (None, crypto.SHARE_BYTES)),
                        Key.KEY_SHARE_OWNERS: (_I64, (None,)),
                        Key.KEY_SHARES: (_U8, (None, 2 * crypto.SHARE_BYTES)),
                        Key.NEXT_MASK_PK: (_U8, (crypto.KEY_BYTES,)),
                        Key.NEXT_ENC_PK: (_U8, (crypto.KEY_BYTES,)),
                    },
                    where,
                )
                s_own = id_list(msg[Key.SEED_SHARE_OWNERS], Key.SEED_SHARE_OWNERS, where)
                k_own = id_list(msg[Key.KEY_SHARE_OWNERS], Key.KEY_SHARE_OWNERS, where)
                asked = self._expected[holder]
                if set(s_own) != set(asked[Key.INCLUDED].tolist()) or set(k_own) != set(asked[Key.DROPPED].tolist()):
                    raise SecAggProtocolError(f"{where}: shares for other clients than asked")
                if len(s_own) != len(msg[Key.SEED_SHARES]) or len(k_own) != len(msg[Key.KEY_SHARES]):
                    raise SecAggProtocolError(f"{where}: owner and share lists differ in length")
            except SecAggProtocolError as err:
                self._reject(holder, str(err))
                continue
            offered = offered_keys(msg)
            if offered is not None:
                self.next_keys[holder] = offered
            for owner, share in zip(s_own, rows(msg[Key.SEED_SHARES]), strict=True):
                seed_shares[owner].append((holder, share))
            for owner, share in zip(k_own, rows(msg[Key.KEY_SHARES]), strict=True):
                key_shares[owner].append((holder, share))

        included = set(self._included)
        dropped = sorted(self._shared - included)
        for owner in sorted(included):
            self._need(seed_shares[owner], owner, "self-mask seed")
        for owner in dropped:
            self._need(key_shares[owner], owner, "mask key")

        assert self._sum is not None
        total = self._sum
        self._sum = None
        wanted: list[Wanted] = [
            (owner, seed_shares[owner], partial(self._seed_matches, owner), "self-mask seed")
            for owner in sorted(included)
        ]
        wanted += [(owner, key_shares[owner], partial(self._key_matches, owner), "mask key") for owner in dropped]
        if self.batch_reconstruction:
            rebuilt = self._reconstruct_all(wanted)
        else:
            rebuilt = [self._reconstruct(*args) for args in wanted]
        for seed in rebuilt[: len(included)]:
            total -= crypto.prg_uint32(seed, self.vector_size)
        for owner, secret in zip(dropped, rebuilt[len(included) :], strict=True):
            key = crypto.new_private_key(secret)
            for other in sorted(set(self.neighbours[owner]) & included):
                pair_seed = crypto.pair_mask_seed(key, self._public_keys[other][0], self.round_id, owner, other)
                mask = crypto.prg_uint32(pair_seed, self.vector_size)
                # `other` added +mask if other < owner, else -mask: take it out
                if other < owner:
                    total -= mask
                else:
                    total += mask
        # m honest inputs on the grid [0, L] sum to at most m * L: more means some client sent values off the
        # grid (wrapping modulo 2^32 to reach further than [-c, c]). It cannot be told which one: refuse the sum.
        ceiling = len(self._included) * self.levels
        if int(total.max()) > ceiling:
            over = int(np.count_nonzero(total > ceiling))
            raise SecAggAborted(
                f"round {self.round_id} at unmask: {over} coordinate(s) of the sum lie outside the range "
                f"{len(self._included)} inputs can reach: a client sent values off the quantization grid"
            )
        self._result = dequantize_sum(total, len(self._included), self.config.clipping_range, self.levels)

    # ------------------------------------------------------------------ helpers

    def _message(self, recipient: int, **fields: npt.NDArray) -> Payload:
        return make(self.round_id, Stage(self.stage), SERVER_ID, recipient, **fields)

    def _send(self, out: dict[int, Payload]) -> dict[int, Payload]:
        self._expected = out
        return out

    def _reject(self, cid: int, reason: str) -> None:
        self.rejected[cid] = f"stage {self.stage}: {reason}"

    def _validate(self, replies: dict[int, Payload]) -> dict[int, Payload]:
        """Replies with a correct header from clients that were sent a message this stage."""
        valid: dict[int, Payload] = {}
        for cid, msg in replies.items():
            if cid not in self._expected:
                self._reject(cid, f"unexpected reply from client {cid}")
                continue
            try:
                round_id, stage, sender, recipient = read_header(msg, f"reply of client {cid}")
                if round_id != self.round_id or stage != self.stage:
                    raise SecAggProtocolError(
                        f"reply for round {round_id} stage {stage}, expected round "
                        f"{self.round_id} stage {self.stage} (replayed or stale)"
                    )
                if sender != cid or recipient != SERVER_ID:
                    raise SecAggProtocolError(
                        f"reply delivered for client {cid} claims sender {sender}, recipient {recipient}"
                    )
            except SecAggProtocolError as err:
                self._reject(cid, str(err))
                continue
            valid[cid] = msg
        return valid

    def _check_neighbourhoods(self, owners: Iterable[int], alive: set[int], when: str) -> None:
        """Abort unless every owner's neighbourhood (itself included) keeps `threshold` alive."""
        if len(alive) < self.threshold:  # also when everyone left: never an empty "sum"
            raise SecAggAborted(
                f"round {self.round_id} {when}: only {len(alive)} clients left, threshold is {self.threshold}"
            )
        for owner in sorted(owners):
            members = {owner, *self.neighbours[owner]}
            left = len(members & alive)
            if left < self.threshold:
                raise SecAggAborted(
                    f"round {self.round_id} {when}: the neighbourhood of client {owner} has "
                    f"{left} of {len(members)} clients left, threshold is {self.threshold}"
                )

    def _reconstruct_all(self, wanted: list[Wanted]) -> list[bytes]:
        """Every secret in `wanted`, in one batch; one that fails verification goes to `_reconstruct`."""
        return reconstruct_all(wanted, self.threshold, self.neighbours, self._reconstruct)

    def _reconstruct(self, owner: int, shares: list[tuple[int, bytes]], verify: Callable[[bytes], bool], what: str,
                     first_failed: bool = False) -> bytes:
        """`owner`'s secret from `threshold` of its (holder, share) pairs, verified (reconstruct.py)."""
        return reconstruct(owner, shares, verify, what, threshold=self.threshold, neighbours=self.neighbours[owner],
                           round_id=self.round_id, batched=self.batch_reconstruction, reject=self._reject,
                           first_failed=first_failed)

    def _seed_matches(self, owner: int, secret: bytes) -> bool:
        return crypto.commit_seed(secret, self.round_id, owner) == self._commitments[owner]

    def _key_matches(self, owner: int, secret: bytes) -> bool:
        key = crypto.new_private_key(secret)
        return crypto.public_bytes(key) == self._public_keys[owner][0]

    def _need(self, shares: list[tuple[int, bytes]], owner: int, what: str) -> None:
        if len(shares) < self.threshold:
            raise SecAggAborted(
                f"round {self.round_id} at unmask: only {len(shares)} shares of the {what} of "
                f"client {owner} arrived, threshold is {self.threshold}"
            )
