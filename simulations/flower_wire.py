"""A fedsite message as Flower records, and back: what the simulation's messages carry.

Each fedsite :class:`~protos.codec.Message` travels as Flower records: its
round, stage and config as the header the gRPC driver's blob carries
(``encode_message`` of the message without tensors) in a ``ConfigRecord``, its
tensors in an ``ArrayRecord``, so a tensor is serialised once on its way, not
as safetensors inside Flower's own serialisation (a safetensors blob of 1M
floats costs ~6 ms to build, the arrays <1 ms). Each ``Array`` holds the
tensor's raw bytes (stype :data:`RAW_STYPE`, dtype numpy's ``dtype.str``):
Flower's own ``numpy.ndarray`` stype is an ``.npy`` file per tensor, whose
header numpy writes and parses (``ast.literal_eval``) every time, ~20 µs a
tensor on each side, i.e. ~0.2 ms per message both ways for a small LoRA
update; raw bytes are copied and checked against the declared dtype and shape,
nothing more. What arrives is the same message, bit for bit, and
``bytes_down``/``bytes_up``
count what the gRPC driver would stream for it, ``len(encode_message(...))``,
computed from names, dtypes and shapes (:func:`encoded_size`, memoised per
layout: every reply of a round has the global state's) rather than by
encoding. A message whose tensors numpy cannot hold (bfloat16) travels as the
safetensors blob, as before.
"""

from __future__ import annotations

import functools
import json
import math
import struct

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import save as st_save

from protos.codec import CodecError, Message, decode_message, encode_message

RECORD = "fedsite"  # the ConfigRecord that carries a fedsite message's header (or, as a fallback, all of it)
HEADER = "header"  # encode_message of the message without its tensors: round, stage, config
TENSORS = "fedsite.tensors"  # the ArrayRecord of its tensors, by name
RAW_STYPE = "fedsite.raw"  # an Array whose data is the tensor's bytes in C order, dtype = numpy's dtype.str
BLOB = "message"  # fallback for tensors numpy cannot hold: the whole encode_message(...) bytes


@functools.cache
def _safetensors_order() -> dict[torch.dtype, tuple[int, str]]:
    """For each dtype safetensors stores: its rank in the file's tensor order and its name there.

    safetensors lays tensors out by dtype (in an order of its own), then by name; the offsets in its
    header, hence the header's length, depend on that order. Read once from the installed safetensors.
    """
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
              torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
    probe = st_save({f"t{i:02d}": torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)})
    (length,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8 : 8 + length])
    names = [name for name in header if name != "__metadata__"]
    return {dtypes[int(name[1:])]: (rank, header[name]["dtype"]) for rank, name in enumerate(names)}


def _tensor_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names in the order safetensors lays the tensors out."""
    order = _safetensors_order()
    return sorted(tensors, key=lambda name: (order[tensors[name].dtype][0], name))


def encoded_size(message: Message) -> int:
    """``len(encode_message(message))`` without encoding the tensors: the header the gRPC driver's blob carries,
    plus one safetensors entry and the bytes of each tensor."""
    head = encode_message(Message(round=message.round, stage=message.stage, config=message.config))
    if not message.tensors:
        return len(head)
    order = _safetensors_order()
    if any(t.dtype not in order for t in message.tensors.values()):
        return len(encode_message(message))
    (length,) = struct.unpack("<Q", head[:8])
    json_len = len(head[8 : 8 + length].rstrip(b" "))  # '{"__metadata__":{...}}', before its padding
    layout = tuple((name, message.tensors[name].dtype, tuple(message.tensors[name].shape))
                   for name in _tensor_order(message.tensors))
    entries_len, data_len = _tensor_entries_size(layout)
    json_len += entries_len
    return 8 + json_len + (-json_len % 8) + data_len


@functools.lru_cache(maxsize=256)
def _tensor_entries_size(layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> tuple[int, int]:
    """The bytes the tensors' entries add to a safetensors header, and the bytes of their data, for tensors
    ``(name, dtype, shape)`` in safetensors' order (a round's messages and replies share one layout)."""
    order = _safetensors_order()
    json_len = offset = 0
    for name, dtype, shape in layout:
        end = offset + math.prod(shape) * dtype.itemsize
        entry = {"dtype": order[dtype][1], "shape": list(shape), "data_offsets": [offset, end]}
        json_len += len(b"," + json.dumps({name: entry}, separators=(",", ":"), ensure_ascii=False)[1:-1].encode())
        offset = end
    return json_len, offset


_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                 torch.int64, torch.uint64, torch.float16, torch.float32, torch.float64}


def pack(message: Message, arrays: dict[int, tuple[torch.Tensor, Array]] | None = None) -> RecordDict:
    """A fedsite message as Flower content: its header in a ConfigRecord, its tensors in an ArrayRecord.

    ``arrays`` (id of a tensor -> (the tensor, its Array)), shared by the messages of one exchange, packs a
    tensor that several messages hold once: a SecAgg+ masked-input message is one per client, each with the
    client's own protocol fields beside the same global model (~4 MB for 1M floats), which was otherwise
    copied into bytes again for every client. The tensor is kept beside its Array so its id stays its own.
    """
    if any(t.dtype not in _NUMPY_DTYPES for t in message.tensors.values()):  # e.g. bfloat16: no numpy twin
        return RecordDict({RECORD: ConfigRecord({BLOB: encode_message(message)})})
    header = encode_message(Message(round=message.round, stage=message.stage, config=message.config))
    content = RecordDict({RECORD: ConfigRecord({HEADER: header})})
    if message.tensors:
        record = ArrayRecord()  # filled in place: ArrayRecord(dict) would copy every Array once more
        for name, tensor in message.tensors.items():
            if arrays is None:
                record[name] = _raw_array(tensor)
                continue
            known = arrays.get(id(tensor))
            if known is None or known[0] is not tensor:
                known = arrays[id(tensor)] = (tensor, _raw_array(tensor))
            record[name] = known[1]
        content[TENSORS] = record
    return content


def _raw_array(tensor: torch.Tensor) -> Array:
    """A tensor as a Flower Array of its raw bytes (:data:`RAW_STYPE`): one copy, no .npy header."""
    value = tensor.detach().cpu().contiguous().numpy()
    return Array(dtype=value.dtype.str, shape=tuple(value.shape), stype=RAW_STYPE, data=value.tobytes())


def _array_value(name: str, array: Array) -> np.ndarray:
    """The numpy array a received Array holds (a writable copy); CodecError if it is not a plain array of its
    declared dtype and shape. Reads :data:`RAW_STYPE` and Flower's own ``numpy.ndarray`` (.npy) arrays."""
    if array.stype == RAW_STYPE:
        try:
            dtype = np.dtype(array.dtype)
        except TypeError as exc:
            raise CodecError(f"tensor {name!r} has an unknown dtype {array.dtype!r}") from exc
        shape = tuple(array.shape)
        if (dtype.kind not in "biuf" or any(not isinstance(n, int) or n < 0 for n in shape)
                or len(array.data) != math.prod(shape) * dtype.itemsize):
            raise CodecError(f"tensor {name!r} is not a plain array of its declared shape")
        # a copy in this machine's byte order: the message's bytes stay immutable, the tensor is writable
        return np.frombuffer(array.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    try:
        value = array.numpy()  # np.load without pickles
    except Exception as exc:  # numpy's own errors on a malformed array, or another stype
        raise CodecError(f"tensor {name!r} not readable: {type(exc).__name__}: {exc}") from exc
    if value.dtype.hasobject or list(value.shape) != list(array.shape):
        raise CodecError(f"tensor {name!r} is not a plain array of its declared shape")
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)


def unpack(content: RecordDict) -> Message:
    """The fedsite message inside Flower content; CodecError if it is not one."""
    record = content.config_records.get(RECORD)
    header = record.get(HEADER) if record is not None else None
    if not isinstance(header, bytes):
        blob = record.get(BLOB) if record is not None else None
        if not isinstance(blob, bytes):
            raise CodecError(f"Flower message carries no {RECORD}.{HEADER} or {RECORD}.{BLOB} bytes")
        return decode_message(blob)
    message = decode_message(header)
    if message.tensors:
        raise CodecError(f"{RECORD}.{HEADER} carries tensors")
    arrays = content.array_records.get(TENSORS)
    if arrays is None:
        return message
    tensors = {name: torch.from_numpy(_array_value(name, array)) for name, array in arrays.items()}
    if any(t.dtype not in _safetensors_order() for t in tensors.values()):
        raise CodecError("a tensor has a dtype the wire format does not carry")
    message.tensors = tensors
    return message
