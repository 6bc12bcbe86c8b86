"""Bytes on the wire: messages as safetensors, blobs as checked chunks.

Every payload fedsite moves (a round's tensors, an update, a secure
aggregation message) is one :class:`Message`: a round, a stage, a small JSON
config and named tensors. It is encoded as a safetensors file whose metadata
holds the JSON, so decoding never unpickles anything and a malformed blob
fails in the parser, not in our code. Blobs larger than a gRPC message are
cut into chunks of at most ``MAX_CHUNK_BYTES`` and reassembled with their
offsets checked and the sha256 of the whole compared at the end.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_CHUNK_BYTES = 4 * 1024 * 1024  # never one gRPC message over 4 MiB
DEFAULT_CHUNK_BYTES = 1024 * 1024
# trailing-metadata key on UNAVAILABLE while the coordinator is still building the job package: it is up
# and answering, so a client waits for it without counting the time against its give-up window
NOT_READY_KEY = "fedsite-package-not-ready"
_METADATA_KEY = "fedsite.message"
_MAX_HEADER_BYTES = 16 * 1024 * 1024


class CodecError(ValueError):
    """A blob or message that cannot be trusted: corrupt, truncated, oversize or malformed."""


@dataclass
class Message:
    """What the coordinator and a client say to each other, transport aside."""

    round: int
    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A state dict as safetensors bytes (contiguous CPU copies; names sorted by safetensors)."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return st_save(plain, metadata=metadata)


def _read_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise CodecError("blob too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise CodecError(f"safetensors header length {header_len} is invalid for a {len(blob)}-byte blob")
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not an object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CodecError("safetensors metadata is not an object")
    return metadata


def decode_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    _read_metadata(blob)  # cheap structural check with our own error type first
    try:
        return dict(st_load(blob))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CodecError(f"not a valid safetensors blob: {exc}") from exc


def encode_message(message: Message) -> bytes:
    meta = json.dumps(
        {"round": message.round, "stage": message.stage, "config": message.config},
        sort_keys=True,
        allow_nan=False,
    )
    return encode_tensors(message.tensors, metadata={_METADATA_KEY: meta})


def decode_message(blob: bytes) -> Message:
    metadata = _read_metadata(blob)
    raw = metadata.get(_METADATA_KEY)
    if raw is None:
        raise CodecError("blob carries no fedsite message header")
    try:
        head = json.loads(raw)
        round_id, stage, config = head["round"], head["stage"], head["config"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise CodecError(f"malformed message header: {type(exc).__name__}") from exc
    if not isinstance(round_id, int) or not isinstance(stage, str) or not isinstance(config, dict):
        raise CodecError("message header has wrong types (round:int, stage:str, config:object)")
    return Message(round=round_id, stage=stage, config=config, tensors=decode_tensors(blob))


def numpy_to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Secure-aggregation payloads are numpy; carry them as tensors without copying."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def tensors_to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


def flatten_state(state: dict[str, torch.Tensor], *, scale: float = 1.0, tail: Sequence[float] = ()) -> np.ndarray:
    """All tensors in name order as one float32 vector (the layout secure aggregation sums), each value
    times ``scale`` (a float32 product), then the values of ``tail``.

    Written straight into the one output buffer: a client's masked input (~1M values) used to be
    concatenated, scaled and concatenated again with its tail, three full copies.
    """
    names = sorted(state)
    size = sum(state[name].numel() for name in names)
    out = np.empty(size + len(tail), dtype=np.float32)
    factor = np.float32(scale)
    offset = 0
    for name in names:
        values = state[name].detach().reshape(-1).to(torch.float32).numpy()
        np.multiply(values, factor, out=out[offset : offset + values.size])  # times 1.0 is exact
        offset += values.size
    out[size:] = np.asarray(tail, dtype=np.float32)
    return out


def unflatten_state(vector: np.ndarray, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state`, shaped like ``template``."""
    out, offset = {}, 0
    for name in sorted(template):
        n = template[name].numel()
        piece = np.ascontiguousarray(vector[offset : offset + n], dtype=np.float32)
        out[name] = torch.from_numpy(piece).reshape(template[name].shape)
        offset += n
    if offset != vector.size:
        raise CodecError(f"vector of {vector.size} values does not fit tensors of {offset}")
    return out


def iter_chunks(blob: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, piece) pairs covering ``blob[offset:]``; an empty blob yields one empty piece."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    if not 0 <= offset <= len(blob):
        raise CodecError(f"offset {offset} outside a blob of {len(blob)} bytes")
    if offset == len(blob):
        yield offset, b""
        return
    for start in range(offset, len(blob), chunk_bytes):
        yield start, blob[start : start + chunk_bytes]


class BlobAssembler:
    """Reassembles chunks in order, enforcing the announced size and digest.

    Chunks must arrive contiguously from ``start_offset`` (a resumed download
    passes the bytes it already has as ``prefix``).
    """

    def __init__(self, total_size: int, sha256: str, *, max_bytes: int, prefix: bytes = b"") -> None:
        if total_size > max_bytes:
            raise CodecError(f"blob of {total_size} bytes exceeds the limit of {max_bytes}")
        if len(sha256) != 64:
            raise CodecError("sha256 must be 64 hex characters")
        self.total_size = total_size
        self.sha256 = sha256
        self._parts = bytearray(prefix)

    @property
    def received(self) -> int:
        return len(self._parts)

    def received_bytes(self) -> bytes:
        return bytes(self._parts)

    def add(self, offset: int, data: bytes) -> None:
        if offset != len(self._parts):
            raise CodecError(f"chunk at offset {offset} out of order (expected {len(self._parts)})")
        if len(data) > MAX_CHUNK_BYTES:
            raise CodecError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
        if len(self._parts) + len(data) > self.total_size:
            raise CodecError("chunks exceed the announced size")
        self._parts.extend(data)

    def finish(self) -> bytes:
        if len(self._parts) != self.total_size:
            raise CodecError(f"incomplete blob: {len(self._parts)} of {self.total_size} bytes")
        blob = bytes(self._parts)
        if sha256_hex(blob) != self.sha256:
            raise CodecError("sha256 mismatch: the blob was corrupted in transit")
        return blob


def assemble(chunks: Iterable[tuple[int, bytes]], total_size: int, sha256: str, *, max_bytes: int) -> bytes:
    assembler = BlobAssembler(total_size, sha256, max_bytes=max_bytes)
    for offset, data in chunks:
        assembler.add(offset, data)
    return assembler.finish()
