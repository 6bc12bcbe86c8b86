"""Fuzz every Coordinator RPC against the real in-process server on loopback.

    python -m simulations.fuzz_rpc [--examples 10000] [--seed 0] [--json OUT]

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
  correct sha256 so they reach the message decoder.

A thread plays the round engine (``Mailbox.exchange`` in a loop), so task
RPCs meet real open tasks. The contract checked for each input: the status is
OK or one of the precise refusals; UNKNOWN or INTERNAL (an exception escaped a
handler) is a finding, except gRPC's own "Exception deserializing request!"
for bytes that are not a valid protobuf message at all, which happens before
any fedsite code runs and is counted separately. No handler may log a
traceback, and health must still be SERVING at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from coordinator.mailbox import Mailbox
from coordinator.registry import ClientRegistry
from coordinator.server import SERVICE_NAME, RunningServer, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos.codec import Message, encode_message, encode_tensors, sha256_hex

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


# -- the service under test -----------------------------------------------------------------


class _TracebackCatcher(logging.Handler):
    """Collects every log record that carries an exception: gRPC logs escaped handler exceptions so."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record.getMessage() + "\n" + "".join(traceback.format_exception(*record.exc_info)))


@dataclass
class FuzzService:
    """Registry, mailbox, servicer and gRPC server as ``fedsite-coordinator serve`` builds them, plus an engine."""

    server: RunningServer
    channel: grpc.Channel
    mailbox: Mailbox
    creds: dict[str, pb.Credentials]
    catcher: _TracebackCatcher
    round: int = 0
    stop_event: threading.Event = field(default_factory=threading.Event)
    engine: threading.Thread | None = None

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
        service = cls(server, channel, mailbox, creds, catcher)
        service.engine = threading.Thread(target=service._engine, args=(round_timeout_s,), daemon=True)
        service.engine.start()
        return service

    def _engine(self, round_timeout_s: float) -> None:
        """Post one train task per fuzz client, wait, repeat: what the round engine does each round."""
        while not self.stop_event.is_set():
            self.round += 1
            task = Message(self.round, "train", {"lr": 0.1}, {"w": torch.ones(4)})
            self.mailbox.exchange(self.round, {c.client_id: task for c in self.creds.values()},
                                  timeout_s=round_timeout_s)

    def open_task(self, who: str) -> pb.Task:
        """The task open for ``who`` right now (polling until the engine posts one)."""
        stub_call = self.channel.unary_unary(f"/{SERVICE_NAME}/PollTask",
                                             request_serializer=pb.PollRequest.SerializeToString,
                                             response_deserializer=pb.Task.FromString)
        deadline = time.monotonic() + 10
        while True:
            task = stub_call(pb.PollRequest(credentials=self.creds[who]), timeout=CALL_TIMEOUT_S)
            if task.kind == pb.Task.RUN or time.monotonic() > deadline:
                return task
            time.sleep(0.01)

    def serving(self) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=CALL_TIMEOUT_S)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.stop_event.set()
        self.mailbox.close("fuzz over")
        logging.getLogger().removeHandler(self.catcher)
        self.channel.close()
        self.server.stop(0)


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
    return st.one_of(enroll, fetch_package, poll, fetch_task, heartbeat, upload)


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


def _task_id(task: pb.Task, other: pb.Task, choice: str) -> str:
    return {"current": task.task_id, "other": other.task_id, "current-upper": task.task_id.upper()}.get(choice, choice)


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
    valid = encode_message(Message(round_id, "train", {"num_examples": 3}, {"w": torch.zeros(4)}))
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
        head = {"round": round_id, "stage": "train", "config": {}}
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
    if tag == "tensors":
        meta = {"fedsite.message": json.dumps({"round": round_id, "stage": "train", "config": {}})}
        if kind[1] == "none":
            return encode_tensors({}, meta)
        if kind[1] == "nan":
            return encode_tensors({"w": torch.full((4,), float("nan"))}, meta)
        if kind[1] == "many":
            return encode_tensors({f"t{i}": torch.zeros(1) for i in range(200)}, meta)
        return _rewrite_header(encode_tensors({"w": torch.zeros(4)}, meta),
                               lambda h: {**h, "w": {**h["w"], "shape": [2**40, 2**40]}})
    raise ValueError(f"unknown blob mutation {tag!r}")


def _upload_messages(service: FuzzService, recipe: tuple[Any, ...]) -> list[pb.UploadChunk]:
    creds_choice, task_choice, blob_kind, size_choice, sha_choice, pieces, strays, order = recipe
    task, other = service.open_task("a"), service.open_task("b")
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


def request_messages(service: FuzzService, case: Case) -> list[Any]:
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
        return _upload_messages(service, r)
    task, other = service.open_task("a"), service.open_task("b")
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


def call(service: FuzzService, case: Case) -> Outcome:
    """Send one case over the wire with no client-side serializer: the server sees exactly these bytes."""
    raw = case.raw if case.raw is not None else tuple(m.SerializeToString() for m in request_messages(service, case))
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

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "codes": dict(self.codes), "by_method": dict(self.by_method),
                "grpc_framing_rejections": self.framing, "findings": [f.__dict__ for f in self.findings],
                "serving_after": self.serving_after, "valid_upload_after": self.valid_upload_after,
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

        import hypothesis

        hypothesis.seed(seed)(body)()
        report.serving_after = service.serving()
        report.valid_upload_after = valid_upload_lands(service)
    finally:
        report.seconds = time.monotonic() - started
        service.close()
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
    yield f"findings (UNKNOWN/INTERNAL from fedsite code, or logged tracebacks): {len(report.findings)}"
    for finding in report.findings[:10]:
        yield f"  {finding.code}: {finding.details}\n    input: {finding.case}"
        for tb in finding.tracebacks[:1]:
            yield "    " + tb.replace("\n", "\n    ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.fuzz_rpc", description=__doc__.splitlines()[0])
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
