"""Peers without a session cannot tie up the coordinator (coordinator/admission.py), over real gRPC on loopback.

Before admission, ~70 Upload streams opened without a message (or any unary method called as a client
stream, which the grpc library does happily) held every worker: health timed out and honest clients were
dropped as silent. Each test holds such calls open from a raw channel and checks what still works.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.admission import AdmissionLimits
from coordinator.mailbox import Mailbox
from coordinator.registry import ClientRegistry
from coordinator.server import SERVICE_NAME, RunningServer, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import sha256_hex
from protos.metadata import session_metadata

LIMITS = AdmissionLimits(first_message_s=2.0, idle_s=2.0, per_peer_method=4, per_peer=8, per_client=3,
                         long_lived=2)


class Service:
    def __init__(self, tmp: Path) -> None:
        self.registry = ClientRegistry.from_tokens(["tok-a", "tok-b"], tmp / "clients.json")
        servicer = CoordinatorServicer(job_name="adm", registry=self.registry,
                                       mailbox=Mailbox(self.registry, heartbeat_timeout_s=30),
                                       package=PackageBlob(b"p" * 1000, sha256_hex(b"p" * 1000)))
        self.server: RunningServer = start_server(servicer, "127.0.0.1:0", limits=LIMITS)
        self.server.set_serving(True)
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def serving(self, timeout: float = 5.0) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path)
    yield svc
    svc.close()


class Silent:
    """Calls opened on a raw channel whose request stream never yields (until released)."""

    def __init__(self, target: str) -> None:
        # a connection of its own, as an attacker has (gRPC would otherwise share one with the test's own calls)
        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.release = threading.Event()
        self.calls: list[grpc.Future] = []

    def _never(self) -> Iterator[bytes]:
        self.release.wait(120)
        return
        yield b""  # pragma: no cover - makes this a generator

    def open(self, method: str, count: int, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        for _ in range(count):
            call = self.channel.stream_unary(f"/{SERVICE_NAME}/{method}" if "/" not in method else method)
            self.calls.append(call.future(self._never(), timeout=120, metadata=metadata))

    def codes(self, wait_s: float = 30.0) -> dict[str, int]:
        """Status codes of every call (waiting up to ``wait_s`` for each to end)."""
        out: dict[str, int] = {}
        deadline = time.monotonic() + wait_s
        for call in self.calls:
            try:
                call.result(timeout=max(0.1, deadline - time.monotonic()))
                name = "OK"
            except grpc.FutureTimeoutError:
                name = "STILL_OPEN"
            except grpc.RpcError as exc:
                name = exc.code().name
            out[name] = out.get(name, 0) + 1
        return out

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


@pytest.fixture
def silent(service: Service) -> Iterator[Silent]:
    attacker = Silent(service.target)
    yield attacker
    attacker.close()


def _poll(service: Service, creds: pb.Credentials) -> pb.Task:
    return service.stub.PollTask(pb.PollRequest(credentials=creds), timeout=5,
                                 metadata=session_metadata(creds.client_id, creds.session_key))


@pytest.mark.parametrize("method", ["Upload", "PollTask", "Enroll", "Heartbeat", "FetchPackage"])
def test_two_hundred_silent_calls_leave_health_and_sessions_working(service: Service, silent: Silent,
                                                                    method: str) -> None:
    creds = service.stub.Enroll(pb.EnrollRequest(token="tok-a"), timeout=5).credentials
    silent.open(method, 200)
    started = time.monotonic()
    assert service.serving()
    assert _poll(service, creds).kind == pb.Task.WAIT  # a client with a session is admitted at once
    other = pb.EnrollRequest(token="tok-b")
    if method != "Enroll":  # enrolment from the same address is only held up by stalled *enrolments*
        assert service.stub.Enroll(other, timeout=5).credentials.client_id
    assert time.monotonic() - started < 30  # a frozen pool answers never; a loaded machine answers late
    codes = silent.codes()
    # a few at a time wait (then are cancelled at the first-message deadline), the rest are refused at once
    assert set(codes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"} and sum(codes.values()) == 200, codes
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= 100, codes
    assert service.serving()


def test_a_silent_call_is_cancelled_at_the_first_message_deadline_and_its_place_freed(service: Service,
                                                                                      silent: Silent) -> None:
    silent.open("Upload", LIMITS.per_peer_method)
    time.sleep(0.5)
    started = time.monotonic()
    assert silent.codes(wait_s=30) == {"CANCELLED": LIMITS.per_peer_method}
    waited = time.monotonic() - started
    assert LIMITS.first_message_s - 1.0 <= waited <= LIMITS.first_message_s + 10
    later = Silent(service.target)
    try:
        later.open("Upload", 1)
        assert later.codes(wait_s=30) == {"CANCELLED": 1}  # admitted (then cancelled), not refused
    finally:
        later.close()


def test_a_session_cannot_hold_more_than_its_share_of_calls(service: Service, silent: Silent) -> None:
    creds = service.stub.Enroll(pb.EnrollRequest(token="tok-a"), timeout=5).credentials
    metadata = session_metadata(creds.client_id, creds.session_key)
    silent.open("Upload", LIMITS.per_client + 2, metadata=metadata)
    time.sleep(0.5)
    assert service.serving()
    codes = silent.codes()
    assert codes == {"CANCELLED": LIMITS.per_client, "RESOURCE_EXHAUSTED": 2}, codes


def test_an_upload_that_stops_sending_is_cancelled(service: Service) -> None:
    creds = service.stub.Enroll(pb.EnrollRequest(token="tok-a"), timeout=5).credentials
    hold = threading.Event()

    def trickle() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(credentials=creds, task_id="t", total_size=10, sha256="0" * 64, offset=0, data=b"x")
        hold.wait(60)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        service.stub.Upload(trickle(), timeout=60)
    hold.set()
    # refused at once (no such task) or cancelled when idle: never held for the client's 60 s deadline
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED)
    assert time.monotonic() - started < LIMITS.idle_s + 10


def test_health_watch_streams_without_a_session_are_capped(service: Service) -> None:
    channel = grpc.insecure_channel(service.target)
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(LIMITS.long_lived + 1)]
    try:
        firsts = []
        for watch in watches:
            try:
                firsts.append(next(watch).status)
            except grpc.RpcError as exc:
                firsts.append(exc.code())
        assert firsts.count(health_pb2.HealthCheckResponse.SERVING) == LIMITS.long_lived
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in firsts
        assert service.serving()
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()


def test_stopping_with_silent_calls_open_does_not_hang(tmp_path: Path) -> None:
    svc = Service(tmp_path)
    attacker = Silent(svc.target)
    try:
        attacker.open("Upload", 50)
        attacker.open("PollTask", 50)
        time.sleep(0.5)
        started = time.monotonic()
        assert svc.server.stop(1.0)
        assert time.monotonic() - started < 15
    finally:
        attacker.close()
        svc.channel.close()


def test_health_watch_streams_closing_while_health_changes_do_not_freeze_shutdown(tmp_path: Path) -> None:
    """The intermittent hang at shutdown: grpc_health's non-blocking Watch deadlocked set() (which holds the
    servicer's lock while waiting for gRPC's polling thread) against a closing Watch's callback (run by that
    thread, needing the lock). Churn watches while the status flips, then stop."""
    svc = Service(tmp_path)
    done = threading.Event()

    def flip() -> None:
        serving = False
        while not done.is_set():
            svc.server.set_serving(serving)
            serving = not serving

    def churn() -> None:
        while not done.is_set():
            with grpc.insecure_channel(svc.target) as channel:
                watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
                           for _ in range(LIMITS.long_lived)]
                for watch in watches:
                    with contextlib.suppress(grpc.RpcError):
                        next(watch)
                for watch in watches:
                    watch.cancel()

    workers = [threading.Thread(target=flip, daemon=True)] + [threading.Thread(target=churn, daemon=True)
                                                              for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(4)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(svc.server.stop(1.0)), daemon=True)
    try:
        stopper.start()
        stopper.join(timeout=30)  # a deadlock shows as a stop that never returns: fail, don't hang the run
        assert stopped == [True]
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=30)
        svc.channel.close()


@pytest.mark.parametrize("method", ["Enroll", "Upload"])
def test_requests_that_do_not_parse_are_refused_and_leave_the_connection_usable(service: Service, method: str) -> None:
    """gRPC's own parsing answered such bytes with INTERNAL and left the HTTP/2 stream open: after 100 of them
    (the coordinator's per-connection stream limit) the connection refused every call, honest ones included."""
    channel = grpc.insecure_channel(service.target)
    try:
        for _ in range(150):
            with pytest.raises(grpc.RpcError) as info:
                if method == "Upload":
                    channel.stream_unary(f"/{SERVICE_NAME}/Upload")(iter([b"\xff\xff\xff"]), timeout=5)
                else:
                    channel.unary_unary(f"/{SERVICE_NAME}/Enroll")(b"\xff\xff\xff", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = pb_grpc.CoordinatorStub(channel)
        assert stub.Enroll(pb.EnrollRequest(token="tok-a"), timeout=5).credentials.client_id
    finally:
        channel.close()
