"""The gRPC servicer: authenticates, validates and hands everything to the mailbox.

Every handler checks its input before use and answers bad calls with a
precise status (PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED); nothing a client sends can take the service down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from coordinator.admission import peer_address
from coordinator.mailbox import Mailbox, ReplyInvalid, TaskError
from coordinator.ratelimit import RateLimiter
from coordinator.registry import AuthError, ClientRegistry, TokenInUse
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import DEFAULT_CHUNK_BYTES, NOT_READY_KEY, BlobAssembler, CodecError, iter_chunks
from protos.metadata import RETRY_AFTER_KEY

log = logging.getLogger("fedsite.servicer")

POLL_INTERVAL_MS = 1000


@dataclass
class PackageBlob:
    """The packed job as clients download it, with the digest they check it against."""
    data: bytes
    sha256: str


def heartbeat_interval_for(timeout_s: float) -> int:
    """Seconds between a busy client's heartbeats: a third of the timeout, 1 to 5 s.

    Two beats can be lost or late (a client starved of CPU, a slow link) before
    the client counts as gone; a fixed 5 s would drop every working client of a
    job whose heartbeat timeout is shorter than that.
    """
    return max(1, min(5, int(timeout_s // 3)))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """The coordinator's RPCs. ``package`` may be None while the job is being prepared (an offsite job
    distils its emulator first): clients can enrol and heartbeat, and a package download is answered
    UNAVAILABLE with :data:`NOT_READY_KEY` until :meth:`set_package` is called."""

    def __init__(self, *, job_name: str, registry: ClientRegistry, mailbox: Mailbox, package: PackageBlob | None,
                 heartbeat_interval_s: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 calls_per_client: RateLimiter | None = None,
                 failed_enrolments_per_address: RateLimiter | None = None) -> None:
        self.job_name = job_name
        self.calls_per_client = calls_per_client
        self.failed_enrolments_per_address = failed_enrolments_per_address
        self.rate_limited = 0
        self.registry = registry
        self.mailbox = mailbox
        self.package = package
        self.slim_package: PackageBlob | None = None
        self.preparing = "preparing the job package"  # what clients are told while package is None
        self.heartbeat_interval_s = heartbeat_interval_s or heartbeat_interval_for(mailbox.heartbeat_timeout_s)
        self.chunk_bytes = chunk_bytes
        self.errors = 0

    def set_package(self, package: PackageBlob, slim: PackageBlob | None = None) -> None:
        """``slim``: the package without the base weights (lora mode), for clients with their own copy."""
        self.slim_package = slim
        self.package = package

    def set_preparing(self, status: str) -> None:
        """What the coordinator is doing before the package exists; waiting clients see it."""
        self.preparing = status

    # -- helpers --------------------------------------------------------------------------

    def _auth(self, credentials: pb.Credentials, context: grpc.ServicerContext) -> str:
        try:
            client_id = self.registry.authenticate(credentials.client_id, credentials.session_key)
        except AuthError as exc:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # unreachable: abort raises
        if self.calls_per_client is not None and not self.calls_per_client.allow(client_id):
            limit = self.calls_per_client
            self._refuse_quietly(context, f"rate limit: more than {limit.rate:g} calls/s (burst {limit.burst:g}) "
                                          "from this client; back off and retry")
        return client_id

    def _refuse_quietly(self, context: grpc.ServicerContext, message: str) -> None:
        """RESOURCE_EXHAUSTED without a log line each time: a flood must not flood the log too."""
        self.errors += 1
        self.rate_limited += 1
        if self.rate_limited in (1, 10, 100) or self.rate_limited % 1000 == 0:
            log.warning("%d calls refused by rate limits so far (latest: %s)", self.rate_limited, message)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.errors += 1
        log.info("refused call: %s: %s", code.name, message)
        context.abort(code, message)

    # -- RPCs -----------------------------------------------------------------------------

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollReply:
        """Trade an enrolment token for a session; wrong tokens count against the caller's address,
        a token held by a live client is refused with when to retry.
        """
        if not request.token or len(request.token) > 1024:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "a token of 1..1024 characters is required")
        address = peer_address(context)
        failures = self.failed_enrolments_per_address
        if failures is not None and failures.exhausted(address):
            self._refuse_quietly(context, "too many failed enrolments from this address; wait and retry")
        try:
            client_id, session_key = self.registry.enroll(request.token, request.client_name)
        except TokenInUse as exc:  # a valid token: not a guess, so it does not count against the address
            context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{exc.retry_after_s:.1f}"),))
            self._abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except AuthError as exc:
            if failures is not None:
                failures.allow(address)  # a wrong token spends one of the address's attempts
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        log.info("enrolled %s (%s)", client_id, request.client_name[:64])
        package = self.package  # None while the job is being prepared
        return pb.EnrollReply(
            credentials=pb.Credentials(client_id=client_id, session_key=session_key),
            job_name=self.job_name, package_sha256=package.sha256 if package else "",
            package_size=len(package.data) if package else 0, heartbeat_interval_s=self.heartbeat_interval_s,
        )

    def _stream(self, blob: bytes, sha256: str, offset: int, context: grpc.ServicerContext,
                on_sent: object = None) -> Iterator[pb.Chunk]:
        if offset > len(blob):
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"offset {offset} is past the end ({len(blob)} bytes)")
        for start, piece in iter_chunks(blob, self.chunk_bytes, offset):
            if callable(on_sent):
                on_sent(len(piece))
            yield pb.Chunk(data=piece, offset=start, total_size=len(blob), sha256=sha256)

    def FetchPackage(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        """Stream the job package from ``offset`` (resumable); UNAVAILABLE while the job is prepared."""
        self._auth(request.credentials, context)
        package = self.package
        if package is None:
            context.set_trailing_metadata(((NOT_READY_KEY, "1"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"job package not ready yet: {self.preparing}")
        assert package is not None
        if request.without_base_weights:
            slim = self.slim_package
            if slim is None:
                self._abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                            "this job has no package without base weights (an offsite job ships an emulator, "
                            "not the model): run the client without --base-model")
            assert slim is not None
            package = slim
        yield from self._stream(package.data, package.sha256, request.offset, context)

    def PollTask(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.Task:
        """The client's task (RUN), DONE when the job has ended, or WAIT with when to poll again."""
        client_id = self._auth(request.credentials, context)
        task = self.mailbox.open_task(client_id)
        if task is not None:
            return pb.Task(kind=pb.Task.RUN, task_id=task.task_id, round=task.round, stage=task.stage,
                           size=len(task.blob), sha256=task.sha256,
                           deadline_s=max(0.0, task.deadline - time.monotonic()))
        if self.mailbox.done_reason is not None:
            return pb.Task(kind=pb.Task.DONE, message=self.mailbox.done_reason)
        return pb.Task(kind=pb.Task.WAIT, retry_after_ms=POLL_INTERVAL_MS, message="waiting for the next round")

    def FetchTask(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        """Stream an open task's message from ``offset``; its bytes count towards the round's bytes down."""
        client_id = self._auth(request.credentials, context)
        try:
            task = self.mailbox.task(client_id, request.task_id)
        except TaskError as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        yield from self._stream(task.blob, task.sha256, request.offset, context,
                                on_sent=lambda n: self.mailbox.count_sent(task, n))

    def Upload(self, request_iterator: Iterator[pb.UploadChunk], context: grpc.ServicerContext) -> pb.UploadReply:
        """Assemble a reply from its chunks (size and sha256 checked) and deliver it to its task.

        The size limit is checked on the first chunk, so an oversized reply is refused before the rest is read.
        """
        first = next(request_iterator, None)
        if first is None:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
        assert first is not None
        client_id = self._auth(first.credentials, context)
        try:
            task = self.mailbox.task(client_id, first.task_id)
        except TaskError as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if first.total_size > task.max_reply_bytes:
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"reply of {first.total_size} bytes exceeds this task's limit of {task.max_reply_bytes}")
        try:
            assembler = BlobAssembler(first.total_size, first.sha256, max_bytes=task.max_reply_bytes)
            assembler.add(first.offset, first.data)
            for chunk in request_iterator:
                if chunk.task_id and chunk.task_id != first.task_id:
                    raise CodecError("task_id changed in the middle of an upload")
                assembler.add(chunk.offset, chunk.data)
            blob = assembler.finish()
        except CodecError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self.mailbox.deliver(client_id, first.task_id, blob)
        except TaskError as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ReplyInvalid as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("round %d: %s reply from %s received (%d bytes)", task.round, task.stage, client_id, len(blob))
        return pb.UploadReply(accepted=True, message="reply accepted")

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        """Mark the client alive while it trains; the reply says whether its task is still open."""
        client_id = self._auth(request.credentials, context)
        return pb.HeartbeatReply(task_alive=self.mailbox.heartbeat(client_id, request.task_id))
