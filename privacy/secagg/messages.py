"""SecAgg+ messages as plain `dict[str, numpy.ndarray]` payloads.

A payload travels unchanged as safetensors over gRPC or as a Flower
ArrayRecord: bytes are uint8 arrays, integers int64 arrays, the masked input a
uint32 array (half the bytes of int64), the clipping range a float64 array.
Every message carries a header: the round id, the stage, the sender and the
recipient (the server is SERVER_ID), so a receiver can refuse anything that
belongs to another round, another stage, another sender or someone else.
This module only builds and checks payloads; the protocol is in client.py and
server.py.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt

from privacy.secagg.errors import SecAggProtocolError

Payload = dict[str, npt.NDArray]

SERVER_ID = -1


class Stage(StrEnum):
    """Protocol stages, in order; a client moves through them once per round."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"

    @classmethod
    def ordered(cls) -> list[Stage]:
        return [cls.SETUP, cls.SHARE_KEYS, cls.MASKED_INPUT, cls.UNMASK]


class Key:
    """Payload keys (one place, so both sides spell them the same)."""

    ROUND = "round"
    STAGE = "stage"
    SENDER = "sender"
    RECIPIENT = "recipient"
    # setup (server -> client)
    NUM_CLIENTS = "num_clients"
    VECTOR_SIZE = "vector_size"
    NEIGHBOURS = "neighbours"
    THRESHOLD = "threshold"
    CLIPPING_RANGE = "clipping_range"
    LEVELS = "quant_levels"
    # setup (client -> server)
    MASK_PK = "mask_public_key"
    ENC_PK = "encryption_public_key"
    # share_keys (server -> client)
    PEERS = "peers"
    PEER_MASK_PKS = "peer_mask_public_keys"
    PEER_ENC_PKS = "peer_encryption_public_keys"
    # share_keys (client -> server)
    DESTINATIONS = "destinations"
    CIPHERTEXTS = "ciphertexts"
    SEED_COMMITMENT = "seed_commitment"
    # masked_input (server -> client)
    SOURCES = "sources"
    # masked_input (client -> server)
    MASKED_INPUT = "masked_input"
    # unmask (server -> client)
    INCLUDED = "included"
    DROPPED = "dropped"
    # unmask (client -> server)
    SEED_SHARE_OWNERS = "seed_share_owners"
    SEED_SHARES = "seed_shares"
    KEY_SHARE_OWNERS = "key_share_owners"
    KEY_SHARES = "key_shares"
    NEXT_MASK_PK = "next_mask_public_key"  # the keys of the client's next round, made ahead (client.py)
    NEXT_ENC_PK = "next_encryption_public_key"


HEADER_KEYS = frozenset({Key.ROUND, Key.STAGE, Key.SENDER, Key.RECIPIENT})


def is_keyed_share_keys(stage: str, payload: Payload) -> bool:
    """Whether a payload of ``stage`` (from :func:`read_header`) is a share_keys that also sets the round up,
    with keys the client made ahead (client.py, "Keys ahead"): it carries the setup's fields."""
    return stage == Stage.SHARE_KEYS and Key.NUM_CLIENTS in payload


def ints(values: object) -> npt.NDArray[np.int64]:
    """An int64 array (scalars become shape (1,))."""
    return np.atleast_1d(np.asarray(values, dtype=np.int64))


def raw(data: bytes) -> npt.NDArray[np.uint8]:
    """Bytes as a uint8 array."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def raw_rows(rows: list[bytes], width: int) -> npt.NDArray[np.uint8]:
    """Equal-length byte strings as a (len, width) uint8 matrix."""
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width).copy()


def make(round_id: int, stage: Stage, sender: int, recipient: int, **fields: npt.NDArray) -> Payload:
    """A payload with its header."""
    payload: Payload = {
        Key.ROUND: ints(round_id),
        Key.STAGE: raw(str(stage).encode()),
        Key.SENDER: ints(sender),
        Key.RECIPIENT: ints(recipient),
    }
    payload.update(fields)
    return payload


def _scalar(payload: Payload, key: str, where: str) -> int:
    arr = payload[key]
    if arr.dtype != np.int64 or arr.shape != (1,):
        raise SecAggProtocolError(f"{where}: '{key}' must be an int64 array of shape (1,), got {arr.dtype}{arr.shape}")
    return int(arr[0])


def read_header(payload: object, where: str) -> tuple[int, str, int, int]:
    """(round, stage, sender, recipient) of a payload, checking its form."""
    if not isinstance(payload, dict):
        raise SecAggProtocolError(f"{where}: payload must be a dict, got {type(payload).__name__}")
    for key, value in payload.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise SecAggProtocolError(f"{where}: payload entries must be str -> numpy.ndarray")
    missing = HEADER_KEYS - payload.keys()
    if missing:
        raise SecAggProtocolError(f"{where}: missing header key(s) {sorted(missing)}")
    stage_arr = payload[Key.STAGE]
    if stage_arr.dtype != np.uint8 or stage_arr.ndim != 1:
        raise SecAggProtocolError(f"{where}: '{Key.STAGE}' must be a 1-D uint8 array")
    try:
        stage = stage_arr.tobytes().decode("ascii")
    except UnicodeDecodeError:
        raise SecAggProtocolError(f"{where}: '{Key.STAGE}' is not ASCII") from None
    if stage not in {str(s) for s in Stage}:
        raise SecAggProtocolError(f"{where}: unknown stage {stage!r}")
    return (
        _scalar(payload, Key.ROUND, where),
        stage,
        _scalar(payload, Key.SENDER, where),
        _scalar(payload, Key.RECIPIENT, where),
    )


def check_fields(payload: Payload, spec: dict[str, tuple[np.dtype, tuple[int | None, ...]]], where: str) -> None:
    """Exactly the header plus `spec`'s keys, each of its dtype and shape (None = any length)."""
    extra = payload.keys() - HEADER_KEYS - spec.keys()
    if extra:
        raise SecAggProtocolError(f"{where}: unexpected key(s) {sorted(extra)}")
    missing = spec.keys() - payload.keys()
    if missing:
        raise SecAggProtocolError(f"{where}: missing key(s) {sorted(missing)}")
    for key, (dtype, shape) in spec.items():
        arr = payload[key]
        ok = arr.dtype == dtype and arr.ndim == len(shape)
        ok = ok and all(want is None or got == want for got, want in zip(arr.shape, shape, strict=True))
        if not ok:
            want_shape = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise SecAggProtocolError(
                f"{where}: '{key}' must be {np.dtype(dtype)} of shape {want_shape}, got {arr.dtype}{arr.shape}"
            )


def rows(arr: npt.NDArray[np.uint8]) -> list[bytes]:
    """The rows of a uint8 matrix as bytes."""
    return [bytes(r) for r in arr]


def id_list(arr: npt.NDArray[np.int64], key: str, where: str) -> list[int]:
    """An int64 id array as a list, refusing duplicates."""
    ids = [int(x) for x in arr]
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError(f"{where}: '{key}' lists a client more than once")
    return ids
