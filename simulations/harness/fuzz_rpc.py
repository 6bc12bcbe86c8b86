"""Fuzz every Coordinator RPC against the real in-process server on loopback.

    python -m simulations.harness.fuzz_rpc [--examples 10000] [--seed 0] [--json OUT]

Two kinds of input, drawn by hypothesis:

* raw: arbitrary request bytes sent through a channel without serializers
  (``channel.unary_unary(method)`` and friends), so the server sees whatever
  protobuf (or non-protobuf) bytes the fuzzer made;
* structured: a valid request built from live state (real credentials, the
  task that is open right now, the package size, a valid encoded reply) with
  each field kept or replaced by a hostile value: forged or foreign
  credentials, offsets past the end, sizes near 2^64, wrong sha256, chunks
  out of order, reply blobs with flipped bits, truncated, with a rewritten
  safetensors/fedsite header (wrong types, deep nesting, huge numbers) under a
  correct sha256 so they reach the message decoder, and well-formed replies
  whose *report* (num_examples, train_loss, epsilon, secagg_weight, ...)
  holds hostile values (strings, NaN, Infinity, 1e308, 2^64, nested objects)
  or whose update is scaled far past the norm bound, so they reach the round
  engine.

A thread runs the real round engine (``RoundEngine.run_round`` over the
mailbox, plain FedAvg on a 4-value model), so task RPCs meet real open tasks
and every delivered reply is aggregated. The contract checked for each input:
the status is OK or one of the precise refusals; UNKNOWN or INTERNAL (an
exception escaped a handler) is a finding, except gRPC's own "Exception
deserializing request!" for bytes that are not a valid protobuf message at
all, which happens before any fedsite code runs and is counted separately. No
handler and no round may log a traceback, the global model must stay finite
and move at most the norm bound per round, and health must still be SERVING
at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from coordinator.checkpoint import Checkpointer
from coordinator.config import parse_job
from coordinator.engine import Exchange, RoundEngine
from coordinator.mailbox import Mailbox
from coordinator.metrics import MetricsLog
from coordinator.registry import ClientRegistry
from coordinator.server import SERVICE_NAME, RunningServer, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos.codec import Message, encode_message, encode_tensors, sha256_hex
from protos.wire import VERSION_KEY, WIRE_VERSION

PRECISE = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.UNAUTHENTICATED})
GRPC_DESERIALIZE_DETAIL = "Exception deserializing request!"
GRPC_DESERIALIZE_LOG = "Exception deserializing message!"
TOKENS = {"a": "fuzz-token-a", "b": "fuzz-token-b", "enrol": "fuzz-token-enrol"}
PACKAGE = bytes(range(256)) * 64  # 16 KiB in 4 KiB chunks: several chunks per download
CHUNK_BYTES = 4096
REQUEST_TYPES: dict[str, Any] = {
    "Enroll": pb.EnrollRequest, "FetchPackage": pb.FetchRequest, "PollTask": pb.PollRequest,
    "FetchTask": pb.FetchRequest, "Upload": pb.UploadChunk, "Heartbeat": pb.HeartbeatRequest,
}
STREAMING_OUT = {"FetchPackage", "FetchTask"}
CALL_TIMEOUT_S = 10.0
UPDATE_BOUND = 10.0  # the fuzz job's [server] max_update_norm: the global model may move at most this per round
REPORT_KEYS = ("num_examples", "train_loss", "steps", "seconds_train", "epsilon", "epsilon_expected",
               "noise_multiplier", "delta", "update_norm", "secagg_weight", "reason", "reason_code", "wire_version")
CURRENT = {VERSION_KEY: WIRE_VERSION}  # every reply of this release says which wire version it speaks


# -- the service under test -----------------------------------------------------------------


class _TracebackCatcher(logging.Handler):
    """Collects every log record that carries an exception: gRPC logs escaped handler exceptions so."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record.getMessage() + "\n" + "".join(traceback.format_exception(*record.exc_info)))


class FuzzModel:
    """The global model of the fuzz job: four trainable values, no evaluation."""

    def __init__(self) -> None:
        self.state = {"w": torch.ones(4)}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def set_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self, folder: Path) -> None:
        """Never called: the fuzz job runs until it is stopped; present because every global model can export."""
        raise NotImplementedError("the fuzz job is never exported")


def _engine_for(folder: Path, round_timeout_s: float) -> tuple[RoundEngine, FuzzModel]:
    table = {"job": {"name": "fuzz", "rounds": 10**9, "clients_per_round": 2, "min_clients": 1,
                     "round_timeout_s": round_timeout_s, "heartbeat_timeout_s": 3600.0, "wait_for_clients_s": 5.0,
                     "sample_grace_s": 0.0},
             "server": {"max_update_norm": UPDATE_BOUND}}
    model = FuzzModel()
    config = parse_job(table, folder)
    return RoundEngine(config, model, Checkpointer(folder / "checkpoints"), MetricsLog(folder / "metrics.jsonl")), model


@dataclass
class FuzzService:
    """Registry, mailbox, servicer and gRPC server as ``fedsite-coordinator serve`` builds them, plus an engine."""

    server: RunningServer
    channel: grpc.Channel
    mailbox: Mailbox
    creds: dict[str, pb.Credentials]
    catcher: _TracebackCatcher
    engine: RoundEngine
    model: FuzzModel
    workdir: Path
    round: int = 0
    stop_event: threading.Event = field(default_factory=threading.Event)
    engine_thread: threading.Thread | None = None
    responder: threading.Thread | None = None
    engine_rounds: int = 0
    engine_rejections: int = 0
    engine_violations: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, round_timeout_s: float = 3.0) -> FuzzService:
        registry = ClientRegistry.from_tokens(list(TOKENS.values()))
        mailbox = Mailbox(registry, heartbeat_timeout_s=3600)
        servicer = CoordinatorServicer(job_name="fuzz", registry=registry, mailbox=mailbox,
                                       package=PackageBlob(PACKAGE, sha256_hex(PACKAGE)), chunk_bytes=CHUNK_BYTES)
        server = start_server(servicer, "127.0.0.1:0", max_workers=8)
        server.set_serving(True)
        catcher = _TracebackCatcher()
        logging.getLogger().addHandler(catcher)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        creds = {}
        for who in ("a", "b"):
            client_id, key = registry.enroll(TOKENS[who], who)
            creds[who] = pb.Credentials(client_id=client_id, session_key=key)
        workdir = Path(tempfile.mkdtemp(prefix="fedsite-fuzz-"))
        engine, model = _engine_for(workdir, round_timeout_s)
        service = cls(server, channel, mailbox, creds, catcher, engine, model, workdir)
        service.engine_thread = threading.Thread(target=service._engine, daemon=True)
        service.engine_thread.start()
        service.responder = threading.Thread(target=service._honest_b, daemon=True)
        service.responder.start()
        return service

    # the engine's Driver: the mailbox, with only a and b to sample (clients that fuzzed enrolments create would
    # never answer, and every round would wait for its deadline)
    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        return sorted(c.client_id for c in self.creds.values())

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        return self.mailbox.exchange(round_id, messages, timeout_s)

    def _honest_b(self) -> None:
        """Client b answers every task of its own honestly, so a round ends as soon as the fuzzed a's reply lands
        (and the engine aggregates many fuzzed replies)."""
        while not self.stop_event.is_set():
            try:
                task = self.open_task("b")
                if task.kind == pb.Task.RUN:
                    recipe = ("other", "current", ("valid",), "right", "right", 1, (), "in-order")
                    call(self, Case("Upload", recipe=recipe), who="b")
            except grpc.RpcError:
                pass
            self.stop_event.wait(0.05)

    def _engine(self) -> None:
        """The real round engine over the mailbox, round after round; what it does with each reply is checked."""
        while not self.stop_event.is_set():
            self.round += 1
            before = self.model.trainable_state()
            try:
                record = self.engine.run_round(self.round, self)
            except Exception:  # the coordinator's job would be dead: the catcher turns this into a finding
                logging.getLogger("fedsite.fuzz").exception("round %d ended the engine", self.round)
                continue
            self.engine_rounds += 1
            self.engine_rejections += int(record.get("rejected_clients", 0))
            after = self.model.trainable_state()
            moved = float(torch.linalg.vector_norm((after["w"] - before["w"]).double()))
            if not torch.isfinite(after["w"]).all() or moved > UPDATE_BOUND * (1 + 1e-6):
                self.engine_violations.append(f"round {self.round}: global model {after['w'].tolist()} moved "
                                              f"{moved:.4g} (bound {UPDATE_BOUND}); record {record}")

    def open_task(self, who: str) -> pb.Task:
        """The task open for ``who`` right now (polling until the engine posts one)."""
        stub_call = self.channel.unary_unary(f"/{SERVICE_NAME}/PollTask",
                                             request_serializer=pb.PollRequest.SerializeToString,
                                             response_deserializer=pb.Task.FromString)
        deadline = time.monotonic() + 10
        while True:
            task = stub_call(pb.PollRequest(credentials=self.creds[who]), timeout=CALL_TIMEOUT_S)
            if task.kind == pb.Task.RUN or time.monotonic() > deadline or self.stop_event.is_set():
                return task
            time.sleep(0.01)

    def serving(self) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=CALL_TIMEOUT_S)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.stop_event.set()
        self.mailbox.close("fuzz over")
        for thread in (self.engine_thread, self.responder):  # before the channel closes under them
            if thread is not None:
                thread.join(timeout=30)
        logging.getLogger().removeHandler(self.catcher)
        self.channel.close()
        self.server.stop(0)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- inputs ---------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=64)
LONG_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1000, max_size=3000)
U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
U32 = st.integers(0, 2**32 - 1)
# valid values are drawn most often, so that most inputs get past authentication to the code behind it
CREDS = st.one_of(st.sampled_from(["valid"] * 8 + ["other", "forged", "empty", "id-only", "enrol"]),
                  st.tuples(TEXT, TEXT))
TASK_ID = st.one_of(st.sampled_from(["current"] * 6 + ["other", "", "current-upper"]), TEXT)
OFFSET = st.one_of(st.sampled_from(["zero", "end", "past-end", "mid"]), U64)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=12)
# what a report field may hold: honest-looking values near the edges, NaN and infinities (JSON as Python writes
# and reads it), huge integers and floats, wrong types
REPORT_VALUE = st.one_of(
    st.integers(-3, 10**6), st.floats(), st.sampled_from([1e308, -1e308, 2**64, 2**53 + 1, 10**30, 0, -1, 0.5, 1.0]),
    st.sampled_from(["lots", "", "NaN", "1e308", True, False, None, [3], {"n": 3}]), JSONISH)
REPORT = st.dictionaries(st.sampled_from(REPORT_KEYS), REPORT_VALUE, max_size=5)
BLOB = st.one_of(
    st.just(("valid",)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1,
                                        max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("round"), st.one_of(JSONISH, st.integers(-(2**80), 2**80))),
    st.tuples(st.just("stage"), st.one_of(JSONISH, st.sampled_from(["train", "declined", "error", "secagg"]))),
    st.tuples(st.just("config"), JSONISH),
    st.tuples(st.just("header"), st.one_of(JSONISH.map(lambda v: json.dumps(v)), TEXT)),
    st.tuples(st.just("outer"), st.one_of(JSONISH.map(lambda v: json.dumps(v)), TEXT)),
    st.tuples(st.just("deep"), st.sampled_from(["meta", "outer"]), st.integers(1, 200_000)),
    st.tuples(st.just("tensors"), st.sampled_from(["none", "nan", "huge-shape", "many"])),
    st.tuples(st.just("report"), REPORT, st.sampled_from([0.0, 1.0, -1.0, 3.0, 1e5, 1e30, -1e38])),
    st.tuples(st.just("report"), REPORT, st.just(0.0)),
    st.tuples(st.just("random"), st.binary(max_size=512)),
)


@dataclass(frozen=True)
class Case:
    """One fuzz input: raw request messages (bytes) or a structured recipe resolved against live state."""

    method: str
    raw: tuple[bytes, ...] | None = None
    recipe: tuple[Any, ...] | None = None

    def describe(self) -> str:
        what = f"raw={[m[:200] for m in self.raw]!r}" if self.raw is not None else f"recipe={self.recipe!r}"
        return f"{self.method} {what}"[:2000]


def raw_cases() -> st.SearchStrategy[Case]:
    unary = st.builds(lambda m, b: Case(m, raw=(b,)),
                      st.sampled_from(["Enroll", "FetchPackage", "PollTask", "FetchTask", "Heartbeat"]),
                      st.binary(max_size=600))
    upload = st.builds(lambda bs: Case("Upload", raw=tuple(bs)), st.lists(st.binary(max_size=600), max_size=4))
    return st.one_of(unary, upload)


def structured_cases() -> st.SearchStrategy[Case]:
    enroll = st.builds(lambda t, n: Case("Enroll", recipe=(t, n)),
                       st.one_of(st.sampled_from(["valid", "", "long"]), TEXT), st.one_of(TEXT, LONG_TEXT))
    fetch_package = st.builds(lambda c, o, t: Case("FetchPackage", recipe=(c, o, t)), CREDS, OFFSET, TASK_ID)
    poll = st.builds(lambda c: Case("PollTask", recipe=(c,)), CREDS)
    fetch_task = st.builds(lambda c, t, o: Case("FetchTask", recipe=(c, t, o)), CREDS, TASK_ID, OFFSET)
    heartbeat = st.builds(lambda c, t, s: Case("Heartbeat", recipe=(c, t, s)), CREDS, TASK_ID, TEXT)
    upload = st.builds(
        lambda *parts: Case("Upload", recipe=parts),
        CREDS, TASK_ID, BLOB,
        st.one_of(st.sampled_from(["right"] * 4), U64),                                # total_size
        st.one_of(st.sampled_from(["right"] * 6 + ["wrong", "short"]), TEXT),          # sha256
        st.integers(1, 4),                                                    # pieces
        st.one_of(st.just(()), st.lists(st.tuples(U64, st.binary(max_size=64), TASK_ID), max_size=2)),  # strays
        st.sampled_from(["in-order"] * 4 + ["reverse", "gap", "overlap"]),
    )
    report = st.builds(lambda r, v: Case("Upload", recipe=("valid", "current", ("report", r, v), "right", "right", 1,
                                                          (), "in-order")),
                       REPORT, st.sampled_from([0.0, 0.1, -1.0, 3.0, 1e30, -1e38]))
    return st.one_of(enroll, fetch_package, poll, fetch_task, heartbeat, upload, report)


def cases() -> st.SearchStrategy[Case]:
    return st.one_of(raw_cases(), structured_cases())


# -- resolving a recipe against live state --------------------------------------------------


def _creds(service: FuzzService, choice: Any) -> pb.Credentials:
    a, b = service.creds["a"], service.creds["b"]
    if isinstance(choice, tuple):
        return pb.Credentials(client_id=choice[0], session_key=choice[1])
    return {
        "valid": a, "other": b, "empty": pb.Credentials(),
        "forged": pb.Credentials(client_id=a.client_id, session_key="0" * 64),
        "id-only": pb.Credentials(client_id=a.client_id),
        "enrol": pb.Credentials(client_id=TOKENS["enrol"], session_key=TOKENS["enrol"]),
    }[choice]


def _task_id(task: pb.Task, other: Callable[[], pb.Task], choice: str) -> str:
    """The task id a recipe names; ``other`` (the other client's open task) is only waited for when named."""
    if choice == "other":
        return other().task_id
    return {"current": task.task_id, "current-upper": task.task_id.upper()}.get(choice, choice)


def _offset(choice: Any, size: int) -> int:
    if isinstance(choice, int):
        return choice
    return {"zero": 0, "end": size, "past-end": size + 1, "mid": size // 2}[choice]


def _rewrite_header(blob: bytes, edit: Any) -> bytes:
    """Replace the safetensors JSON header (the tensors' bytes stay), keeping the blob well framed."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    new_header = edit(header)
    raw = new_header if isinstance(new_header, bytes) else json.dumps(new_header).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + header_len :]


def reply_blob(round_id: int, kind: tuple[Any, ...]) -> bytes:
    valid = encode_message(Message(round_id, "train", {**CURRENT, "num_examples": 3}, {"w": torch.zeros(4)}))
    tag = kind[0]
    if tag == "valid":
        return valid
    if tag == "flip":
        data = bytearray(valid)
        for pos, xor in kind[1]:
            data[pos % len(data)] ^= xor
        return bytes(data)
    if tag == "truncate":
        return valid[: kind[1]]
    if tag == "random":
        return bytes(kind[1])

    def with_head(**change: Any) -> bytes:
        head = {"round": round_id, "stage": "train", "config": dict(CURRENT)}
        head.update(change)
        return _rewrite_header(valid, lambda h: {**h, "__metadata__": {"fedsite.message": json.dumps(head)}})

    if tag in ("round", "stage", "config"):
        return with_head(**{tag: kind[1]})
    if tag == "header":
        return _rewrite_header(valid, lambda h: {**h, "__metadata__": {"fedsite.message": kind[1]}})
    if tag == "outer":
        return _rewrite_header(valid, lambda h: kind[1].encode())
    if tag == "deep":
        nested = "[" * kind[2] + "]" * kind[2]
        if kind[1] == "meta":
            return _rewrite_header(valid, lambda h: {**h, "__metadata__": {"fedsite.message": nested}})
        return _rewrite_header(valid, lambda h: nested.encode())
    if tag == "report":  # a well-formed reply: the hostile values are in its report and in how far it moves
        _, report, value = kind
        config = {**CURRENT, "num_examples": 3, **report}
        head = json.dumps({"round": round_id, "stage": "train", "config": config})  # NaN/Infinity as Python writes
        return encode_tensors({"w": torch.full((4,), value)}, metadata={"fedsite.message": head})
    if tag == "tensors":
        meta = {"fedsite.message": json.dumps({"round": round_id, "stage": "train", "config": CURRENT})}
        if kind[1] == "none":
            return encode_tensors({}, meta)
        if kind[1] == "nan":
            return encode_tensors({"w": torch.full((4,), float("nan"))}, meta)
        if kind[1] == "many":
            return encode_tensors({f"t{i}": torch.zeros(1) for i in range(200)}, meta)
        return _rewrite_header(encode_tensors({"w": torch.zeros(4)}, meta),
                               lambda h: {**h, "w": {**h["w"], "shape": [2**40, 2**40]}})
    raise ValueError(f"unknown blob mutation {tag!r}")


def _upload_messages(service: FuzzService, recipe: tuple[Any, ...], who: str = "a") -> list[pb.UploadChunk]:
    creds_choice, task_choice, blob_kind, size_choice, sha_choice, pieces, strays, order = recipe
    task = service.open_task(who)

    def other() -> pb.Task:
        return service.open_task("b" if who == "a" else "a")

    blob = reply_blob(task.round, blob_kind)
    sha = {"right": sha256_hex(blob), "wrong": "f" * 64, "short": sha256_hex(blob)[:10]}.get(sha_choice, sha_choice)
    step = max(1, -(-len(blob) // pieces))
    parts = [(off, blob[off : off + step]) for off in range(0, len(blob), step)] or [(0, b"")]
    if order == "reverse":
        parts.reverse()
    elif order == "gap" and len(parts) > 1:
        parts.pop(1)
    elif order == "overlap":
        parts.insert(1, parts[0])
    messages = [pb.UploadChunk(credentials=_creds(service, creds_choice), task_id=_task_id(task, other, task_choice),
                               total_size=len(blob) if size_choice == "right" else size_choice, sha256=sha,
                               offset=parts[0][0], data=parts[0][1])]
    messages += [pb.UploadChunk(offset=off, data=data) for off, data in parts[1:]]
    messages += [pb.UploadChunk(offset=o, data=d, task_id=_task_id(task, other, t)) for o, d, t in strays]
    return messages


def request_messages(service: FuzzService, case: Case, who: str = "a") -> list[Any]:
    """The protobuf request message(s) a structured case stands for, built from the current state."""
    assert case.recipe is not None
    r = case.recipe
    if case.method == "Enroll":
        token = {"valid": TOKENS["enrol"], "long": "x" * 1025}.get(r[0], r[0])
        return [pb.EnrollRequest(token=token, client_name=r[1])]
    if case.method == "PollTask":
        return [pb.PollRequest(credentials=_creds(service, r[0]))]
    if case.method == "FetchPackage":
        return [pb.FetchRequest(credentials=_creds(service, r[0]), offset=_offset(r[1], len(PACKAGE)),
                                task_id=r[2] if r[2] not in ("current", "other", "current-upper") else "")]
    if case.method == "Upload":
        return _upload_messages(service, r, who)
    task = service.open_task("a")

    def other() -> pb.Task:
        return service.open_task("b")
    if case.method == "FetchTask":
        return [pb.FetchRequest(credentials=_creds(service, r[0]), task_id=_task_id(task, other, r[1]),
                                offset=_offset(r[2], task.size))]
    return [pb.HeartbeatRequest(credentials=_creds(service, r[0]), task_id=_task_id(task, other, r[1]), status=r[2])]


# -- running ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str


@dataclass
class Finding:
    case: str
    code: str
    details: str
    tracebacks: list[str]


def _parses(method: str, raw: tuple[bytes, ...]) -> bool:
    try:
        for message in raw:
            REQUEST_TYPES[method].FromString(message)
        return True
    except Exception:  # DecodeError and friends: not a protobuf message of this type
        return False


def call(service: FuzzService, case: Case, who: str = "a") -> Outcome:
    """Send one case over the wire with no client-side serializer: the server sees exactly these bytes."""
    raw = case.raw if case.raw is not None else tuple(m.SerializeToString()
                                                       for m in request_messages(service, case, who))
    path = f"/{SERVICE_NAME}/{case.method}"
    try:
        if case.method == "Upload":
            service.channel.stream_unary(path)(iter(raw), timeout=CALL_TIMEOUT_S)
        elif case.method in STREAMING_OUT:
            for _ in service.channel.unary_stream(path)(raw[0], timeout=CALL_TIMEOUT_S):
                pass
        else:
            service.channel.unary_unary(path)(raw[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(grpc.StatusCode.OK, "")


def verdict(case: Case, outcome: Outcome) -> str:
    """'ok', 'framing' (gRPC refused non-protobuf bytes before any fedsite code) or 'bad'."""
    if outcome.code in PRECISE:
        return "ok"
    if (outcome.code == grpc.StatusCode.INTERNAL and outcome.details == GRPC_DESERIALIZE_DETAIL
            and case.raw is not None and not _parses(case.method, case.raw)):
        return "framing"
    return "bad"


@dataclass
class FuzzReport:
    inputs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    framing: int = 0
    findings: list[Finding] = field(default_factory=list)
    serving_after: bool = False
    valid_upload_after: bool = False
    seconds: float = 0.0
    engine_rounds: int = 0
    engine_rejections: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "codes": dict(self.codes), "by_method": dict(self.by_method),
                "grpc_framing_rejections": self.framing, "findings": [f.__dict__ for f in self.findings],
                "serving_after": self.serving_after, "valid_upload_after": self.valid_upload_after,
                "engine_rounds": self.engine_rounds, "engine_rejections": self.engine_rejections,
                "seconds": round(self.seconds, 1)}


def run_one(service: FuzzService, case: Case, report: FuzzReport) -> Finding | None:
    before = len(service.catcher.records)
    outcome = call(service, case)
    report.inputs += 1
    report.codes[outcome.code.name] += 1
    report.by_method[case.method] += 1
    kind = verdict(case, outcome)
    report.framing += kind == "framing"
    if kind == "bad":  # give the handler thread a moment to log what escaped it
        time.sleep(0.2)
    new_tracebacks = service.catcher.records[before:]
    if kind == "framing":  # gRPC logs its own DecodeError for these; that is the framing rejection itself
        new_tracebacks = [t for t in new_tracebacks if not t.startswith(GRPC_DESERIALIZE_LOG)]
    if kind == "bad" or new_tracebacks:
        finding = Finding(case.describe(), outcome.code.name, outcome.details[:500], list(new_tracebacks))
        report.findings.append(finding)
        return finding
    return None


def fuzz(examples: int, seed: int = 0, *, stop_at_first: bool = False) -> FuzzReport:
    """Run ``examples`` hypothesis inputs against a fresh service; collect every finding (never raise on one)."""
    report = FuzzReport()
    service = FuzzService.start()
    started = time.monotonic()
    try:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=cases())
        def body(case: Case) -> None:
            finding = run_one(service, case, report)
            if finding is not None and stop_at_first:
                raise AssertionError(finding)

        import hypothesis  # noqa: PLC0415 - a dev dependency, only for the seeded search

        hypothesis.seed(seed)(body)()
        report.serving_after = service.serving()
        report.valid_upload_after = valid_upload_lands(service)
    finally:
        report.seconds = time.monotonic() - started
        service.close()
        report.engine_rounds, report.engine_rejections = service.engine_rounds, service.engine_rejections
        for violation in service.engine_violations:
            report.findings.append(Finding("round engine", "BOUND", violation[:2000], []))
    return report


def valid_upload_lands(service: FuzzService, attempts: int = 5) -> bool:
    """After the fuzz, an honest client's upload to its open task is still accepted (nothing got wedged)."""
    honest = Case("Upload", recipe=("valid", "current", ("valid",), "right", "right", 2, (), "in-order"))
    # the engine may close the task between our poll and the upload: then try the next one
    return any(call(service, honest).code == grpc.StatusCode.OK for _ in range(attempts))


def _iter_lines(report: FuzzReport) -> Iterator[str]:
    yield (f"inputs: {report.inputs} in {report.seconds:.0f}s; serving after: {report.serving_after}; "
           f"valid upload accepted after: {report.valid_upload_after}")
    yield f"status codes: {dict(report.codes.most_common())}"
    yield f"per method: {dict(report.by_method.most_common())}"
    yield f"gRPC framing rejections (INTERNAL before fedsite code): {report.framing}"
    yield f"rounds the engine ran: {report.engine_rounds}; replies it rejected: {report.engine_rejections}"
    yield f"findings (UNKNOWN/INTERNAL from fedsite code, or logged tracebacks): {len(report.findings)}"
    for finding in report.findings[:10]:
        yield f"  {finding.code}: {finding.details}\n    input: {finding.case}"
        for tb in finding.tracebacks[:1]:
            yield "    " + tb.replace("\n", "\n    ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.harness.fuzz_rpc", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default="", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    # no console handler: the catcher (a root handler) collects every logged traceback for the report
    report = fuzz(args.examples, args.seed)
    for line in _iter_lines(report):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report.as_dict(), handle, indent=2)
    return 0 if not report.findings and report.serving_after and report.valid_upload_after else 1


if __name__ == "__main__":
    sys.exit(main())
