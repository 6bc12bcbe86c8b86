"""The codec: messages round-trip, blobs chunk under 4 MiB, corruption is caught."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from protos.codec import (
    MAX_CHUNK_BYTES,
    BlobAssembler,
    CodecError,
    Message,
    assemble,
    decode_message,
    decode_tensors,
    encode_message,
    flatten_state,
    iter_chunks,
    numpy_to_tensors,
    sha256_hex,
    tensors_to_numpy,
    unflatten_state,
)


def test_message_round_trip_keeps_tensors_and_config() -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    message = Message(round=7, stage="train", config={"lr": 0.5, "names": ["x"]}, tensors=tensors)
    back = decode_message(encode_message(message))
    assert (back.round, back.stage, back.config) == (7, "train", {"lr": 0.5, "names": ["x"]})
    assert set(back.tensors) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(back.tensors[name], value)


def test_numpy_payloads_including_uint32_survive() -> None:
    arrays: dict[str, np.ndarray] = {
        "masked": np.arange(10, dtype=np.uint32) * 400_000_000,
        "key": np.frombuffer(b"abc", np.uint8),
    }
    back = tensors_to_numpy(decode_message(encode_message(Message(1, "s", {}, numpy_to_tensors(arrays)))).tensors)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)


def test_chunking_above_4_mib_reassembles_and_respects_the_limit() -> None:
    blob = encode_message(Message(0, "train", {}, {"big": torch.randn(3 * 1024 * 1024)}))  # ~12 MiB
    assert len(blob) > 3 * MAX_CHUNK_BYTES
    chunks = list(iter_chunks(blob, MAX_CHUNK_BYTES))
    assert len(chunks) == -(-len(blob) // MAX_CHUNK_BYTES) and all(len(piece) <= MAX_CHUNK_BYTES for _, piece in chunks)
    assert assemble(chunks, len(blob), sha256_hex(blob), max_bytes=len(blob)) == blob
    with pytest.raises(ValueError):
        list(iter_chunks(blob, MAX_CHUNK_BYTES + 1))


def test_resumed_download_from_an_offset() -> None:
    blob = bytes(range(256)) * 1000
    first = list(iter_chunks(blob, 10_000))[:3]
    prefix = b"".join(piece for _, piece in first)
    assembler = BlobAssembler(len(blob), sha256_hex(blob), max_bytes=len(blob), prefix=prefix)
    for offset, piece in iter_chunks(blob, 10_000, offset=len(prefix)):
        assembler.add(offset, piece)
    assert assembler.finish() == blob


def test_sha256_mismatch_is_detected() -> None:
    blob = b"x" * 5000
    chunks = list(iter_chunks(blob, 1000))
    offset, piece = chunks[2]
    chunks[2] = (offset, b"y" + piece[1:])
    with pytest.raises(CodecError, match="sha256 mismatch"):
        assemble(chunks, len(blob), sha256_hex(blob), max_bytes=len(blob))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda chunks: chunks[1:], "out of order"),
        (lambda chunks: chunks[:-1], "incomplete"),
        (lambda chunks: [*chunks, (5000, b"z")], "exceed"),
    ],
)
def test_out_of_order_missing_and_extra_chunks_are_refused(
    mutate: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]], match: str
) -> None:
    blob = b"q" * 5000
    with pytest.raises(CodecError, match=match):
        assemble(mutate(list(iter_chunks(blob, 1000))), len(blob), sha256_hex(blob), max_bytes=len(blob))


def test_oversize_blob_is_refused_before_receiving() -> None:
    with pytest.raises(CodecError, match="exceeds the limit"):
        BlobAssembler(10_000, "0" * 64, max_bytes=9_999)


@pytest.mark.parametrize("blob", [b"", b"\x00" * 7, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!}xxxxx"])
def test_garbage_is_a_codec_error_not_a_crash(blob: bytes) -> None:
    with pytest.raises(CodecError):
        decode_message(blob)
    with pytest.raises(CodecError):
        decode_tensors(blob)


def test_plain_safetensors_without_header_is_not_a_message() -> None:
    from safetensors.torch import save

    with pytest.raises(CodecError, match="no fedsite message header"):
        decode_message(save({"a": torch.zeros(2)}))


def test_flatten_state_scales_and_appends_in_one_buffer_like_the_concatenation_it_replaced() -> None:
    """Bit for bit what the masked input was before (cat, times a float32 weight, then the tail),
    with a bfloat16 and a non-contiguous tensor among float32 ones; unflatten_state inverts it."""
    state = {"b.lora_B": torch.randn(7, 3).t(), "a.lora_A": torch.randn(4, 5),
             "head": torch.randn(2, 3, dtype=torch.bfloat16)}
    weight, tail = 0.37, (0.37 * 0.05,)
    flat = torch.cat([state[n].reshape(-1).to(torch.float32) for n in sorted(state)]).numpy()
    before = np.concatenate([flat * np.float32(weight), np.array(tail, np.float32)])
    after = flatten_state(state, scale=weight, tail=tail)
    assert after.dtype == np.float32 and np.array_equal(after, before)
    assert np.array_equal(flatten_state(state), flat)
    back = unflatten_state(flatten_state(state), state)
    assert all(torch.equal(back[n], state[n].to(torch.float32)) for n in state)
