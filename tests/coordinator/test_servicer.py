"""The gRPC service under bad input: precise status codes, and it stays up with nothing lost.

A real server on loopback with the real registry and mailbox; the engine side
is played by a thread calling ``Mailbox.exchange`` exactly as the round
engine does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.agent import Agent, AgentOptions
from coordinator.engine import Exchange
from coordinator.mailbox import Mailbox, TaskError
from coordinator.registry import ClientRegistry
from coordinator.server import RunningServer, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob, heartbeat_interval_for
from emulator.package import pack
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import (
    MAX_CHUNK_BYTES,
    NOT_READY_KEY,
    Message,
    assemble,
    decode_message,
    encode_message,
    iter_chunks,
    sha256_hex,
)

PACKAGE = bytes(range(256)) * 40_000  # ~10 MB: several chunks

# what the ``service`` fixture yields
Service = tuple[pb_grpc.CoordinatorStub, Mailbox, grpc.Channel, CoordinatorServicer]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    registry = ClientRegistry.from_tokens(["good-a", "good-b"], tmp_path / "clients.json")
    mailbox = Mailbox(registry, heartbeat_timeout_s=30)
    servicer = CoordinatorServicer(job_name="t", registry=registry, mailbox=mailbox,
                                   package=PackageBlob(PACKAGE, sha256_hex(PACKAGE)))
    server: RunningServer = start_server(servicer, "127.0.0.1:0")
    server.set_serving(True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.CoordinatorStub(channel), mailbox, channel, servicer
    channel.close()
    server.stop(0)


def _enrol(stub: pb_grpc.CoordinatorStub, token: str) -> pb.Credentials:
    return stub.Enroll(pb.EnrollRequest(token=token, client_name="test"), timeout=5).credentials


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _upload_chunks(creds: pb.Credentials, task_id: str, blob: bytes, *, sha: str | None = None,
                   size: int | None = None) -> Iterator[pb.UploadChunk]:
    for i, (offset, piece) in enumerate(iter_chunks(blob, 1 << 20)):
        if i == 0:
            yield pb.UploadChunk(credentials=creds, task_id=task_id, total_size=len(blob) if size is None else size,
                                 sha256=sha or sha256_hex(blob), offset=offset, data=piece)
        else:
            yield pb.UploadChunk(offset=offset, data=piece)


def _serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_enrolment_and_package_download_in_chunks(service: Service) -> None:
    stub, _, channel, servicer = service
    assert _code(lambda: stub.Enroll(pb.EnrollRequest(token="wrong"), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: stub.Enroll(pb.EnrollRequest(token=""), timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    creds = _enrol(stub, "good-a")
    chunks = list(stub.FetchPackage(pb.FetchRequest(credentials=creds), timeout=30))
    assert len(chunks) > 1 and all(len(c.data) <= MAX_CHUNK_BYTES for c in chunks)
    assert assemble(((c.offset, c.data) for c in chunks), len(PACKAGE), chunks[0].sha256, max_bytes=1 << 30) == PACKAGE
    resumed = list(stub.FetchPackage(pb.FetchRequest(credentials=creds, offset=len(PACKAGE) - 10), timeout=30))
    assert b"".join(c.data for c in resumed) == PACKAGE[-10:]
    # the package without base weights: refused where the job has none (offsite), streamed where it has
    slim_request = pb.FetchRequest(credentials=creds, without_base_weights=True)
    assert _code(lambda: list(stub.FetchPackage(slim_request, timeout=5))) == grpc.StatusCode.FAILED_PRECONDITION
    slim = PACKAGE[:5000]
    servicer.set_package(PackageBlob(PACKAGE, sha256_hex(PACKAGE)), slim=PackageBlob(slim, sha256_hex(slim)))
    assert b"".join(c.data for c in stub.FetchPackage(slim_request, timeout=30)) == slim
    past_end = pb.FetchRequest(credentials=creds, offset=len(PACKAGE) + 1)
    assert _code(lambda: list(stub.FetchPackage(past_end, timeout=5))) == grpc.StatusCode.INVALID_ARGUMENT
    forged = pb.Credentials(client_id=creds.client_id, session_key="0" * 64)
    assert _code(lambda: stub.PollTask(pb.PollRequest(credentials=forged), timeout=5)) == \
        grpc.StatusCode.PERMISSION_DENIED
    # enrolling again with the same token supersedes the old session: one token, one live client
    newer = _enrol(stub, "good-a")
    assert newer.client_id == creds.client_id
    assert _code(lambda: stub.PollTask(pb.PollRequest(credentials=creds), timeout=5)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert stub.PollTask(pb.PollRequest(credentials=newer), timeout=5).kind == pb.Task.WAIT
    assert _serving(channel)


def test_bad_uploads_are_refused_precisely_and_the_good_one_lands(service: Service) -> None:
    stub, mailbox, channel, _ = service
    a, b = _enrol(stub, "good-a"), _enrol(stub, "good-b")
    state = {"w": torch.ones(3, 2)}
    results: list[Exchange] = []
    engine = threading.Thread(target=lambda: results.append(
        mailbox.exchange(4, {a.client_id: Message(4, "train", {"x": 1}, state)}, timeout_s=30)))
    engine.start()
    task = stub.PollTask(pb.PollRequest(credentials=a), timeout=5)
    while task.kind != pb.Task.RUN:
        task = stub.PollTask(pb.PollRequest(credentials=a), timeout=5)
    assert (task.round, task.stage) == (4, "train")
    blob = b"".join(c.data for c in stub.FetchTask(pb.FetchRequest(credentials=a, task_id=task.task_id), timeout=5))
    assert sha256_hex(blob) == task.sha256 and torch.equal(decode_message(blob).tensors["w"], state["w"])

    def upload(creds: pb.Credentials, data: bytes, **kw: object) -> pb.UploadReply:
        return stub.Upload(_upload_chunks(creds, task.task_id, data, **kw), timeout=10)  # type: ignore[arg-type]

    good = encode_message(Message(4, "train", {"num_examples": 3}, {"w": torch.zeros(3, 2)}))
    codes = {
        "garbage": _code(lambda: upload(a, b"\x00garbage" * 100)),
        "wrong sha": _code(lambda: upload(a, good, sha="f" * 64)),
        "oversize": _code(lambda: upload(a, good, size=1 << 40)),
        "wrong round": _code(lambda: upload(a, encode_message(Message(3, "train", {}, {})))),
        "wrong stage": _code(lambda: upload(a, encode_message(Message(4, "secagg.unmask", {}, {})))),
        "other client's task": _code(lambda: upload(b, good)),
        "unknown task": _code(lambda: stub.Upload(_upload_chunks(a, "nope", good), timeout=10)),
        "empty upload": _code(lambda: stub.Upload(iter(()), timeout=10)),
    }
    assert codes == {
        "garbage": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong sha": grpc.StatusCode.INVALID_ARGUMENT,
        "oversize": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "wrong round": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong stage": grpc.StatusCode.INVALID_ARGUMENT,
        "other client's task": grpc.StatusCode.FAILED_PRECONDITION,
        "unknown task": grpc.StatusCode.FAILED_PRECONDITION,
        "empty upload": grpc.StatusCode.INVALID_ARGUMENT,
    }
    assert _serving(channel)
    assert upload(a, good).accepted
    assert _code(lambda: upload(a, good)) == grpc.StatusCode.FAILED_PRECONDITION  # replay of the same upload
    engine.join(timeout=30)
    (result,) = results
    assert set(result.replies) == {a.client_id} and not result.failures
    assert torch.equal(result.replies[a.client_id].tensors["w"], torch.zeros(3, 2))
    assert result.bytes_up == len(good) and result.bytes_down == len(blob)
    # the task is closed: heartbeats say so, and polls go back to WAIT
    assert not stub.Heartbeat(pb.HeartbeatRequest(credentials=a, task_id=task.task_id), timeout=5).task_alive
    assert stub.PollTask(pb.PollRequest(credentials=a), timeout=5).kind == pb.Task.WAIT


def test_silent_client_is_a_dropout_not_a_hang(tmp_path: Path) -> None:
    registry = ClientRegistry.from_tokens(["t1"])
    mailbox = Mailbox(registry, heartbeat_timeout_s=0.5)
    client_id, _ = registry.enroll("t1")
    result = mailbox.exchange(1, {client_id: Message(1, "train", {}, {})}, timeout_s=30)
    assert not result.replies and "heartbeat" in result.failures[client_id]


def test_job_done_is_announced(service: Service) -> None:
    stub, mailbox, _, _ = service
    creds = _enrol(stub, "good-b")
    mailbox.close("job complete")
    task = stub.PollTask(pb.PollRequest(credentials=creds), timeout=5)
    assert task.kind == pb.Task.DONE and task.message == "job complete"


def test_a_dropped_clients_late_reply_is_refused_not_counted_twice() -> None:
    """Once a client is dropped for silence its task closes at once, while the round still waits for others."""
    registry = ClientRegistry.from_tokens(["t1", "t2"])
    mailbox = Mailbox(registry, heartbeat_timeout_s=1.0)
    silent, _ = registry.enroll("t1")
    alive, alive_key = registry.enroll("t2")
    results = []
    engine = threading.Thread(target=lambda: results.append(mailbox.exchange(
        1, {silent: Message(1, "train", {}, {}), alive: Message(1, "train", {}, {})}, timeout_s=60)))
    engine.start()

    def beat_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline
            registry.authenticate(alive, alive_key)  # the other client keeps beating
            time.sleep(0.05)

    beat_until(lambda: mailbox.open_task(silent) is not None)
    silent_task = mailbox.open_task(silent)
    assert silent_task is not None
    beat_until(lambda: mailbox.open_task(silent) is None)  # dropped: its task is closed ...
    assert mailbox.open_task(alive) is not None and not results  # ... while the round still waits
    late_reply = Message(1, "train", {"num_examples": 1}, {})
    with pytest.raises(TaskError):  # the silent client comes back too late
        mailbox.deliver(silent, silent_task.task_id, encode_message(late_reply))
    alive_task = mailbox.open_task(alive)
    assert alive_task is not None
    mailbox.deliver(alive, alive_task.task_id, encode_message(late_reply))
    engine.join(timeout=30)
    (result,) = results
    assert set(result.replies) == {alive}
    assert set(result.failures) == {silent} and "heartbeat" in result.failures[silent]


def test_heartbeats_come_three_times_per_timeout_at_most_every_five_seconds() -> None:
    assert [heartbeat_interval_for(t) for t in (3, 6, 8, 20, 60, 3600)] == [1, 2, 2, 5, 5, 5]


def test_a_client_waits_for_a_coordinator_still_preparing_its_package(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Listening before the package exists: enrolment works, downloads say 'not ready' and what the
    coordinator is doing, a real client waits past its give-up window (the coordinator answers) and
    logs that status, health is NOT_SERVING meanwhile."""
    registry = ClientRegistry.from_tokens(["t"])
    servicer = CoordinatorServicer(job_name="t", registry=registry,
                                   mailbox=Mailbox(registry, heartbeat_timeout_s=30), package=None)
    server = start_server(servicer, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        assert not _serving(channel)
        stub = pb_grpc.CoordinatorStub(channel)
        creds = _enrol(stub, "t")
        servicer.set_preparing("distilling the emulator: step 3/10, hidden_loss 0.25")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchPackage(pb.FetchRequest(credentials=creds), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "job package not ready yet: distilling the emulator: step 3/10, hidden_loss 0.25"
        assert NOT_READY_KEY in dict(info.value.trailing_metadata())
        agent = Agent(AgentOptions(coordinator=f"127.0.0.1:{server.port}", token="t", data=tmp_path / "unused",
                                   state_dir=tmp_path / "state", give_up_after_s=1.0))
        agent.enrol()
        fetched: list[Path] = []
        download = threading.Thread(target=lambda: fetched.append(agent.fetch_package()))
        download.start()
        caplog.set_level(logging.INFO, logger="fedsite.client")
        download.join(timeout=7)  # past the 1 s give-up window and a retry
        assert download.is_alive() and not fetched
        assert "distilling the emulator: step 3/10" in caplog.text
        folder = tmp_path / "package"
        folder.mkdir()
        (folder / "job.json").write_text("{}")
        blob = pack(folder)
        servicer.set_package(PackageBlob(blob, sha256_hex(blob)))
        server.set_serving(True)
        download.join(timeout=60)
        assert fetched and (fetched[0] / "job.json").read_text() == "{}"
        assert _serving(channel)
        agent.channel.close()
    finally:
        channel.close()
        server.stop(0)


def test_a_second_coordinator_on_a_port_in_use_fails_instead_of_sharing_it(service: Service) -> None:
    """gRPC sets SO_REUSEPORT by default; with it two coordinators would silently split the clients."""
    _, _, _, servicer = service
    first = start_server(servicer, "127.0.0.1:0")
    try:
        with pytest.raises(OSError, match=r"cannot bind 127\.0\.0\.1"):
            start_server(servicer, f"127.0.0.1:{first.port}")
    finally:
        first.stop(0)
