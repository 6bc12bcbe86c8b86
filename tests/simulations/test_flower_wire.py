"""What a simulated message carries through Flower, and the runtime an actor keeps per node.

The Flower driver moves a fedsite Message as a header (the gRPC blob's, without tensors) and an
ArrayRecord of its tensors: what comes out must be the message that went in, bit for bit, and the
bytes it counts must be len(encode_message(message)), what
the gRPC driver streams. An actor reuses the ClientRuntime it kept for a node only while the node's
Context shows nobody else served it since.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.codec import CodecError, Message, decode_message, encode_message
from simulations.flower_driver import NodeDispatch
from simulations.flower_wire import BLOB, HEADER, RAW_STYPE, RECORD, TENSORS, encoded_size, pack, unpack

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint64]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def _same(a: Message, b: Message) -> None:
    assert (a.round, a.stage, a.config) == (b.round, b.stage, b.config)
    assert set(a.tensors) == set(b.tensors)
    for name, tensor in a.tensors.items():
        other = b.tensors[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        assert torch.equal(_bits(tensor), _bits(other)), name


names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 5), max_size=3)
configs = st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-10**12, 10**12), st.text(max_size=8),
                                                         st.booleans(), st.floats(allow_nan=False,
                                                                                  allow_infinity=False)),
                          max_size=4)


@settings(max_examples=60, deadline=None)
@given(tensors=st.dictionaries(names, st.tuples(st.sampled_from(DTYPES), shapes), max_size=6),
       config=configs, round_id=st.integers(0, 10**6), stage=st.sampled_from(["train", "secagg", "declined"]))
def test_a_message_crosses_flower_unchanged_and_counts_the_grpc_bytes(tensors: dict, config: dict, round_id: int,
                                                                      stage: str) -> None:
    generator = torch.Generator().manual_seed(0)
    message = Message(round=round_id, stage=stage, config=config, tensors={
        name: (torch.randint(0, 2, shape, generator=generator) if dtype == torch.bool
               else torch.randn(shape, generator=generator) * 100).to(dtype)
        for name, (dtype, shape) in tensors.items()})
    blob = encode_message(message)
    assert encoded_size(message) == len(blob)
    received = unpack(pack(message))
    _same(received, decode_message(blob))
    assert encoded_size(received) == len(blob)


def test_tensors_ride_as_arrays_and_bfloat16_as_the_blob() -> None:
    plain = Message(round=2, stage="train", config={"lr": 0.1}, tensors={"w": torch.ones(3, 4), "b": torch.zeros(4)})
    content = pack(plain)
    assert set(content.array_records[TENSORS]) == {"w", "b"} and HEADER in content.config_records[RECORD]
    half = Message(round=2, stage="train", tensors={"w": torch.ones(3, dtype=torch.bfloat16)})
    content = pack(half)
    assert TENSORS not in content.array_records and BLOB in content.config_records[RECORD]
    _same(unpack(content), half)
    empty = Message(round=1, stage="declined", config={"reason": "budget"})
    assert TENSORS not in pack(empty).array_records
    _same(unpack(pack(empty)), empty)


def test_messages_of_one_exchange_pack_a_shared_tensor_once() -> None:
    """A SecAgg+ masked-input message per client, each with its own fields beside the same global model: with
    the exchange's memo the model's tensors become one Array each, and every message still unpacks to itself."""
    model = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    messages = [Message(round=3, stage="secagg", config={"client_index": i},
                        tensors={**model, "secagg/own": torch.full((4,), float(i))}) for i in range(3)]
    memo: dict[int, Any] = {}
    contents = [pack(message, memo) for message in messages]
    for name in model:
        assert len({id(content.array_records[TENSORS][name]) for content in contents}) == 1, name
    assert len({id(content.array_records[TENSORS]["secagg/own"]) for content in contents}) == 3
    for message, content in zip(messages, contents, strict=True):
        _same(message, unpack(content))
        _same(message, unpack(pack(message)))  # and as without the memo


def test_malformed_content_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        unpack(RecordDict({RECORD: ConfigRecord({"other": 1})}))
    with_tensors = encode_message(Message(round=1, stage="train", tensors={"x": torch.ones(1)}))
    with pytest.raises(CodecError, match="carries tensors"):
        unpack(RecordDict({RECORD: ConfigRecord({HEADER: with_tensors})}))
    header = encode_message(Message(round=1, stage="train"))
    bad = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not an npy file")
    with pytest.raises(CodecError, match="not readable"):
        unpack(RecordDict({RECORD: ConfigRecord({HEADER: header}), TENSORS: ArrayRecord({"x": bad})}))
    lying = Array.from_numpy_ndarray(np.zeros(3, np.float32))
    lying.shape = (4,)
    with pytest.raises(CodecError, match="declared shape"):
        unpack(RecordDict({RECORD: ConfigRecord({HEADER: header}), TENSORS: ArrayRecord({"x": lying})}))


def test_tensors_travel_as_raw_bytes_not_npy_files() -> None:
    """An Array holds the tensor's bytes (no .npy header to write and parse); what unpack returns is a writable
    copy, so training on it cannot change the bytes of the message it came in."""
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    content = pack(Message(round=1, stage="train", tensors={"w": weights, "flag": torch.tensor([True, False])}))
    array = content.array_records[TENSORS]["w"]
    assert array.stype == RAW_STYPE and array.data == weights.numpy().tobytes()
    assert (array.dtype, tuple(array.shape)) == (weights.numpy().dtype.str, (3, 4))
    received = unpack(content).tensors["w"]
    received += 1
    assert array.data == weights.numpy().tobytes()
    # Flower's own numpy arrays (.npy) are still read
    header = encode_message(Message(round=1, stage="train"))
    npy = RecordDict({RECORD: ConfigRecord({HEADER: header}),
                      TENSORS: ArrayRecord({"x": Array.from_numpy_ndarray(np.arange(3, dtype=np.int64))})})
    assert torch.equal(unpack(npy).tensors["x"], torch.arange(3))


@pytest.mark.parametrize(("dtype", "shape", "data", "match"), [
    ("<f4", (2,), b"\0" * 4, "declared shape"),  # 4 bytes for two float32
    ("<f4", (-1,), b"", "declared shape"),
    ("|O", (1,), b"\0" * 8, "declared shape"),  # objects
    ("<U2", (1,), b"\0" * 8, "declared shape"),  # strings are not tensors
    ("not-a-dtype", (1,), b"\0", "unknown dtype"),
])
def test_a_malformed_raw_array_is_a_codec_error(dtype: str, shape: tuple[int, ...], data: bytes, match: str) -> None:
    header = encode_message(Message(round=1, stage="train"))
    bad = Array(dtype=dtype, shape=shape, stype=RAW_STYPE, data=data)
    with pytest.raises(CodecError, match=match):
        unpack(RecordDict({RECORD: ConfigRecord({HEADER: header}), TENSORS: ArrayRecord({"x": bad})}))
    other = Array(dtype="<f4", shape=(1,), stype="some.other", data=b"\0" * 4)
    with pytest.raises(CodecError, match="not readable"):
        unpack(RecordDict({RECORD: ConfigRecord({HEADER: header}), TENSORS: ArrayRecord({"x": other})}))


def test_the_driver_is_woken_once_every_awaited_reply_is_stored() -> None:
    """Not once per reply: each wake-up is a pull of the link state on the driver's thread."""
    dispatch = NodeDispatch()
    dispatch.await_replies(["a", "b", "c"])
    dispatch.reply_stored("a")
    dispatch.reply_stored("old")  # a straggler of an earlier exchange
    dispatch.reply_stored("b")
    assert not dispatch.replied.is_set()
    dispatch.reply_stored("c")
    assert dispatch.replied.is_set()
    dispatch.replied.clear()
    dispatch.reply_stored("c")  # stored twice (it cannot be, but it must not wake the next exchange's driver)
    dispatch.await_replies(["d"])
    assert not dispatch.replied.is_set()
    dispatch.await_replies([])  # nothing was accepted: nothing to wait for
    assert dispatch.replied.is_set()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Message]:
    from coordinator.config import load_job
    from coordinator.job import prepare_job
    from simulations.flower_app import ClientSettings
    from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job
    from simulations.runner import SimulationOptions, apply_overrides, partition_table

    work = tmp_path_factory.mktemp("wire")
    job = tiny_job(work, make_tiny_bert(work / "tiny-bert"), clients=3, per_round=3, rounds=1,
                   max_train_examples=120)
    config = apply_overrides(load_job(job), SimulationOptions())
    out = work / "out"
    ready = prepare_job(config, out)
    (out / "partitions.json").write_text(json.dumps(partition_table(config)))
    settings = ClientSettings(package_dir=str(ready.package.folder), output_dir=str(out),
                              train_data=str(config.resolve(config.simulation.train_data)),  # type: ignore[union-attr]
                              partitions_file=str(out / "partitions.json"), threads=1, cache_clients=2)
    return settings, ready.engine.train_message(1, 3)


def test_an_actor_reuses_a_nodes_runtime_only_while_nobody_else_served_it(prepared: tuple[Any, Message]) -> None:
    from simulations.flower_app import _STATE, NODE_RECORD, handle_message

    settings, message = prepared

    def context(partition: int) -> Context:
        return Context(run_id=1, node_id=10 + partition, node_config={"partition-id": partition}, state=RecordDict(),
                       run_config={})

    _STATE.clear()
    try:
        node0, node1, node2 = context(0), context(1), context(2)
        first = handle_message(settings, message, node0)
        kept = _STATE.runtimes[(settings.package_dir, settings.output_dir, 0)]
        assert kept[0] == node0.state.config_records[NODE_RECORD]["serial"] == 1
        again = handle_message(settings, message, node0)
        assert _STATE.runtimes[(settings.package_dir, settings.output_dir, 0)] == (2, kept[1])  # reused
        assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)

        # another actor served the node in between: its Context names that actor; start afresh
        node0.state[NODE_RECORD] = ConfigRecord({"holder": "another-actor", "serial": 3})
        handle_message(settings, message, node0)
        assert _STATE.runtimes[(settings.package_dir, settings.output_dir, 0)][1] is not kept[1]
        assert node0.state.config_records[NODE_RECORD]["serial"] == 4

        # a Context Flower did not update (the message failed) no longer matches the kept runtime
        stale = Context(run_id=1, node_id=10, node_config={"partition-id": 0},
                        state=RecordDict({NODE_RECORD: ConfigRecord({"holder": _STATE.token, "serial": 1})}),
                        run_config={})
        before = _STATE.runtimes[(settings.package_dir, settings.output_dir, 0)][1]
        handle_message(settings, message, stale)
        assert _STATE.runtimes[(settings.package_dir, settings.output_dir, 0)][1] is not before

        # the data LRU (2 clients here) bounds the runtimes kept too
        handle_message(settings, message, node1)
        handle_message(settings, message, node2)
        assert set(_STATE.runtimes) == {(settings.package_dir, settings.output_dir, p) for p in (1, 2)}
        runtime = _STATE.runtimes[(settings.package_dir, settings.output_dir, 1)][1]

        def fail(message: Message) -> Message:
            raise RuntimeError("training failed")

        runtime.handle = fail
        with pytest.raises(RuntimeError, match="training failed"):
            handle_message(settings, message, node1)
        assert (settings.package_dir, settings.output_dir, 1) not in _STATE.runtimes  # dropped with the failure
    finally:
        _STATE.clear()


def test_the_client_app_pickles_as_its_settings_and_is_built_once_per_process(prepared: tuple[Any, Message]) -> None:
    """Flower's Ray backend pickles the ClientApp with every message: it must not carry its handlers' code each
    time, and an actor must not rebuild it per message."""
    import pickle

    from ray import cloudpickle

    from simulations.flower_app import client_app_for, make_client_app

    settings, _ = prepared
    app = make_client_app(settings)
    blob = cloudpickle.dumps(app)
    assert len(blob) < 1000, len(blob)  # its settings and a function's name, not cloudpickled closures
    first, second = pickle.loads(blob), pickle.loads(cloudpickle.dumps(app))
    assert first is second is client_app_for(settings)
    assert set(first._registered_funcs) == set(app._registered_funcs) == {"query.default", "train.default"}
