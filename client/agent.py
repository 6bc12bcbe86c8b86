"""The edge client's loop over gRPC: enrol, fetch, then poll, train and upload until done.

The client opens every connection (it may sit behind NAT). It keeps its
identity and the verified job package in its state directory, so a restarted
client neither re-downloads nor re-enrols; an interrupted package download
resumes from the bytes on disk. When the coordinator is unreachable (down,
restarting with --resume) the client retries with exponential backoff and
carries on when it is back.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from client.connection_check import probe, tls_failure
from client.runtime import ClientRuntime
from emulator.base_fingerprint import restore_base_weights
from emulator.job_spec import JobSpec
from emulator.models import ModelLoadError
from emulator.package import PackageError, unpack
from localio.atomic import atomic_write_bytes, atomic_write_json
from localio.data import Example, read_examples
from localio.errors import UserError
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    NOT_READY_KEY,
    BlobAssembler,
    CodecError,
    Message,
    decode_message,
    encode_message,
    iter_chunks,
    sha256_hex,
)
from protos.metadata import RETRY_AFTER_KEY, session_metadata
from protos.wire import DeclineReason, Stage, refusal

log = logging.getLogger("fedsite.client")

T = TypeVar("T")
UNARY_DEADLINE_S = 30.0
STREAM_DEADLINE_S = 900.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
PREPARING_RETRY_S = 5.0
TLS_ATTEMPTS = 3  # a TLS mismatch ends the client after this many attempts
MAX_PACKAGE_BYTES = 64 * 1024**3
MAX_TASK_BYTES = 16 * 1024**3
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 64 * 1024),
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 64 * 1024),
]


def _package_not_ready(exc: grpc.RpcError) -> bool:
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(key == NOT_READY_KEY for key, _ in trailing or ())


@dataclass
class AgentOptions:
    """Everything ``fedsite-client run`` was told; the agent reads nothing else from the command line."""
    coordinator: str
    token: str
    data: Path
    state_dir: Path
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    name: str = field(default_factory=platform.node)
    give_up_after_s: float = 900.0
    base_model: str | None = None  # lora jobs: a local copy of the base model, checked against the fingerprint


class _Reenrol(Exception):
    """The coordinator no longer knows our session (it was restarted without its registry, or another client
    took our token over after we went silent)."""


class _TokenInUse(Exception):
    """Enrolment refused: another client holds our token and is alive (it may be us, a moment ago)."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


def _retry_after(exc: grpc.RpcError) -> float:
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, min(float(value), 3600.0))
            except ValueError:
                break
    return 60.0


class Agent:
    """One client's life against one coordinator: enrol, fetch and verify the package, then poll, train and
    upload until the job is done. The client opens every connection (pull), so it works behind NAT and
    firewalls, and what it must keep across restarts (session, package, privacy ledger) is in ``state_dir``.
    """
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.state_dir = options.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.channel = self._channel()
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.credentials: pb.Credentials | None = None
        self.heartbeat_interval_s = 5.0
        self.announced_package = ""  # the package sha256 the coordinator announced when we enrolled ("" = unknown)
        self.task_errors = 0

    # -- connection -----------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        o = self.options
        if o.ca_cert is None:
            if o.cert or o.key:
                raise UserError("--cert/--key need --ca-cert (mutual TLS runs over TLS)")
            log.warning("connecting to %s WITHOUT TLS (pass --ca-cert to encrypt)", o.coordinator)
            return grpc.insecure_channel(o.coordinator, options=CHANNEL_OPTIONS)
        try:
            ca = o.ca_cert.read_bytes()
            cert = o.cert.read_bytes() if o.cert else None
            key = o.key.read_bytes() if o.key else None
        except OSError as exc:
            raise UserError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.secure_channel(o.coordinator, creds, options=CHANNEL_OPTIONS)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run an RPC, retrying with backoff while the coordinator is unreachable.

        A coordinator still preparing the job package (it says so in trailing
        metadata) is reachable: the client waits for it as long as it takes.
        """
        delay, started = 1.0, time.monotonic()
        last_note = -1e18
        failures = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()
                detail = exc.details() or ""
                failures += 1
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    detail = self._explain_unreachable(detail, failures)
                if _package_not_ready(exc):
                    if time.monotonic() - last_note > 60:
                        log.info("%s: %s; waiting", what, detail)
                        last_note = time.monotonic()
                    time.sleep(PREPARING_RETRY_S)
                    delay, started = 1.0, time.monotonic()
                    continue
                if code == grpc.StatusCode.ALREADY_EXISTS and what == "enrol":
                    raise _TokenInUse(detail, _retry_after(exc)) from exc
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    if what == "enrol":
                        raise UserError(f"coordinator refused enrolment: {detail}") from exc
                    raise _Reenrol(detail) from exc
                if code not in RETRYABLE:
                    raise UserError(f"{what} failed: {code.name}: {detail}") from exc
                if time.monotonic() - started > self.options.give_up_after_s:
                    raise UserError(
                        f"coordinator {self.options.coordinator} unreachable for "
                        f"{self.options.give_up_after_s:.0f}s ({code.name}: {detail})"
                    ) from exc
                log.warning("%s: %s (%s); retrying in %.0fs", what, code.name, detail, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _explain_unreachable(self, detail: str, failures: int) -> str:
        """gRPC's detail, or the TLS mismatch behind it. A mismatch cannot heal by retrying: after a few
        attempts it ends the client in one line (before, it retried for 15 minutes saying "Socket closed")."""
        reason = tls_failure(detail)
        if reason is None and failures % 10 == TLS_ATTEMPTS and "Socket closed" in detail:
            o = self.options
            reason = probe(o.coordinator, o.ca_cert, o.cert, o.key)  # gRPC said nothing more: ask directly
        if reason is None:
            return detail
        if failures >= TLS_ATTEMPTS:
            raise UserError(f"cannot connect to {self.options.coordinator}: {reason}")
        return reason

    def _session(self) -> tuple[tuple[str, str], ...]:
        """Call metadata naming our session: the coordinator admits such calls before their first message."""
        creds = self.credentials
        return session_metadata(creds.client_id, creds.session_key) if creds is not None else ()

    # -- enrolment and package ------------------------------------------------------------

    def _credentials_path(self) -> Path:
        return self.state_dir / "credentials.json"

    def enrol(self, *, force: bool = False) -> None:
        """Reuse the saved session for this coordinator, or trade the token for a new one (``force``: the
        coordinator refused the saved one). The session is saved so a restarted client keeps its identity.
        """
        path = self._credentials_path()
        if not force and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("coordinator") == self.options.coordinator:
                self.credentials = pb.Credentials(client_id=saved["client_id"], session_key=saved["session_key"])
                self.heartbeat_interval_s = float(saved.get("heartbeat_interval_s", self.heartbeat_interval_s))
                self.announced_package = str(saved.get("package_sha256", ""))
                return
        reply = self._enrol_call()
        self.credentials = reply.credentials
        self.heartbeat_interval_s = float(reply.heartbeat_interval_s or 5)
        self.announced_package = reply.package_sha256
        atomic_write_json(path, {"coordinator": self.options.coordinator, "client_id": reply.credentials.client_id,
                                 "session_key": reply.credentials.session_key,
                                 "heartbeat_interval_s": self.heartbeat_interval_s,
                                 "package_sha256": reply.package_sha256})
        log.info("enrolled as %s for job %r", reply.credentials.client_id, reply.job_name)

    def _enrol_call(self) -> pb.EnrollReply:
        """Enroll; if our token's client is alive, wait once for the takeover window (that client may be a
        crashed earlier run of ours), then give up with the coordinator's message."""
        request = pb.EnrollRequest(token=self.options.token, client_name=self.options.name)
        for attempt in (1, 2):
            try:
                return self._call("enrol", lambda: self.stub.Enroll(request, timeout=UNARY_DEADLINE_S))
            except _TokenInUse as exc:
                if attempt == 2:
                    raise UserError(f"coordinator refused enrolment: {exc.detail}") from exc
                wait = exc.retry_after_s + 2.0
                log.warning("%s; trying again in %.0fs in case that client is gone", exc.detail, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _download(self, rpc: Callable[..., Iterator[pb.Chunk]], request_for: Callable[[int], pb.FetchRequest],
                  *, partial: Path | None, max_bytes: int, what: str) -> bytes:
        """Fetch a chunked blob, resuming from ``partial`` (bytes already on disk) when given."""
        have = partial.read_bytes() if partial is not None and partial.exists() else b""

        def fetch() -> bytes:
            nonlocal have
            assembler: BlobAssembler | None = None
            for chunk in rpc(request_for(len(have)), timeout=STREAM_DEADLINE_S, metadata=self._session()):
                if assembler is None:
                    assembler = BlobAssembler(chunk.total_size, chunk.sha256, max_bytes=max_bytes, prefix=have)
                assembler.add(chunk.offset, chunk.data)
                # every 64 chunks, persist what arrived so a crash resumes from there
                checkpoint_due = assembler.received % (64 * DEFAULT_CHUNK_BYTES) < len(chunk.data)
                if partial is not None and chunk.data and checkpoint_due:
                    have = assembler.received_bytes()
                    atomic_write_bytes(partial, have)
            if assembler is None:
                raise CodecError(f"{what}: empty stream")
            return assembler.finish()

        try:
            return self._call(what, fetch)
        except CodecError:
            if partial is not None:
                partial.unlink(missing_ok=True)  # a corrupt partial download starts over
            raise

    def _current_package(self, slim: bool, size: int) -> str:
        """The sha256 of the package the coordinator serves now. Asked for from byte ``size`` (the size of the
        package we hold), so a package of that size costs one empty chunk; a shorter one is refused, which also
        means it differs."""
        if not slim and self.announced_package:
            return self.announced_package
        assert self.credentials is not None
        request = pb.FetchRequest(credentials=self.credentials, offset=size, without_base_weights=slim)

        def first_chunk() -> str:
            stream = self.stub.FetchPackage(request, timeout=UNARY_DEADLINE_S, metadata=self._session())
            try:
                return next(iter(stream)).sha256
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # past the end: not the package we hold
                    return ""
                raise
            finally:
                stream.cancel()

        return self._call("package check", first_chunk)

    def _stored_package(self, marker: Path, slim: bool) -> Path | None:
        """The package folder in the state directory, if it is the one this coordinator serves now.

        A state directory used with another job (or a job started afresh) holds another package: training with
        it failed on every task; now it is set aside and this job's package is fetched.
        """
        if not marker.exists():
            return None
        stored = json.loads(marker.read_text())
        folder = Path(stored["folder"])
        if not (folder / "job.json").exists():
            return None
        current = self._current_package(slim, int(stored.get("size", 0)))
        if current == stored.get("sha256"):
            return folder
        log.warning("the job package in %s (sha256 %s...) is not the one %s serves (%s...); fetching this job's "
                    "package", self.state_dir, str(stored.get("sha256"))[:12], self.options.coordinator,
                    current[:12] or "a different size")
        return None

    def fetch_package(self) -> Path:
        """The job package's folder: the one already unpacked if it is this job's, else downloaded (resumable),
        checked against its sha256 and unpacked; with ``--base-model`` the base weights come from that local copy
        and must match the job's fingerprint.
        """
        marker = self.state_dir / "package.json"
        own = self.options.base_model
        slim = bool(own)
        stored = self._stored_package(marker, slim)
        if stored is not None:
            return stored
        assert self.credentials is not None
        creds = self.credentials
        partial = self.state_dir / ("package-slim.partial" if own else "package.partial")
        blob = self._download(self.stub.FetchPackage,
                              lambda off: pb.FetchRequest(credentials=creds, offset=off, without_base_weights=slim),
                              partial=partial, max_bytes=MAX_PACKAGE_BYTES, what="package download")
        folder = self.state_dir / f"package-{sha256_hex(blob)[:16]}"
        shutil.rmtree(folder, ignore_errors=True)  # a half-restored folder from a crash
        unpack(blob, folder)
        if own:
            log.info("job package without base weights (%.1f MB); loading the base model from %s", len(blob) / 1e6, own)
            try:
                restore_base_weights(folder, own)
            except (PackageError, ModelLoadError, OSError) as exc:
                shutil.rmtree(folder, ignore_errors=True)
                raise UserError(str(exc)) from exc
            log.info("base model from %s matches the job's fingerprint", own)
        atomic_write_json(marker, {"folder": str(folder), "sha256": sha256_hex(blob), "size": len(blob)})
        partial.unlink(missing_ok=True)
        log.info("job package verified (%.1f MB)", len(blob) / 1e6)
        return folder

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Take part until the coordinator says the job is done: exit status 0, or 1 if any task failed here.

        A bad data file fails first, before anything is downloaded; a refused session enrols again.
        """
        # a bad data file fails here, in one line, before enrolling and downloading the package
        examples = read_examples(self.options.data, need_label=False)
        log.info("%s: %d examples", self.options.data, len(examples))
        self.enrol()
        while True:
            try:
                return self._run_enrolled()
            except _Reenrol as exc:
                log.warning("session refused (%s); enrolling again", exc)
                self.enrol(force=True)

    def _run_enrolled(self) -> int:
        assert self.credentials is not None
        creds = self.credentials
        # loading a large model takes longer than a heartbeat timeout: keep saying we are here, or a
        # coordinator that samples this client meanwhile would count it as gone before it even polled
        with self._keep_alive(creds):
            folder = self.fetch_package()
            # the typed spec: a corrupt job.json is one clear PackageError, not a KeyError
            local = read_examples(self.options.data, need_label=JobSpec.load(folder).task == "classification")
            runtime = self.make_runtime(folder, local)
        log.info("ready: %d local examples", len(local))
        while True:
            task = self._call("poll", lambda: self.stub.PollTask(pb.PollRequest(credentials=creds),
                                                                 timeout=UNARY_DEADLINE_S,
                                                                 metadata=self._session()))
            if task.kind == pb.Task.DONE:
                log.info("coordinator says the job is done (%s)", task.message)
                if self.task_errors:
                    log.error("%d task(s) failed on this client (see the errors above)", self.task_errors)
                    return 1
                return 0
            if task.kind == pb.Task.WAIT:
                time.sleep(max(task.retry_after_ms, 100) / 1000)
                continue
            self._run_task(task, runtime, creds)

    def make_runtime(self, folder: Path, examples: list[Example]) -> ClientRuntime:
        """What handles this client's tasks (a test's hostile client substitutes its own)."""
        return ClientRuntime.from_package(folder, examples, state_dir=self.state_dir, source=str(self.options.data))

    def encode_reply(self, reply: Message) -> bytes:
        """The bytes uploaded for ``reply`` (a test's hostile client rewrites them)."""
        return encode_message(reply)

    def _run_task(self, task: pb.Task, runtime: ClientRuntime, creds: pb.Credentials) -> None:
        blob = self._download(self.stub.FetchTask,
                              lambda off: pb.FetchRequest(credentials=creds, task_id=task.task_id, offset=off),
                              partial=None, max_bytes=MAX_TASK_BYTES, what="task download")
        message = decode_message(blob)
        label = task.stage + (f"/{message.config['secagg_stage']}" if "secagg_stage" in message.config else "")
        log.info("round %d: %s", task.round, label)
        with self._keep_alive(creds, task.task_id) as alive:
            try:
                reply = runtime.handle(message)
            except Exception as exc:  # report, don't die: the coordinator counts it as a failed client
                log.exception("task failed")
                reply = refusal(message.round, DeclineReason.FAILED, str(exc)[:500], stage=Stage.ERROR)
        if not alive.is_set():
            log.warning("round %d: the coordinator stopped waiting for this task; not uploading", task.round)
            return
        if reply.stage == Stage.ERROR:
            self.task_errors += 1
        if not self._upload(task.task_id, reply, creds):
            return
        if reply.stage == Stage.ERROR:
            log.error("round %d: %s failed here; the coordinator was told (%s)", task.round, label,
                      reply.config.get("reason", ""))
        elif reply.stage == Stage.DECLINED:
            log.warning("round %d: %s declined (%s)", task.round, label, reply.config.get("reason", ""))
        else:
            log.info("round %d: %s reply accepted", task.round, label)

    @contextmanager
    def _keep_alive(self, creds: pb.Credentials, task_id: str = "") -> Iterator[threading.Event]:
        """Heartbeat in the background while the body runs; the event clears if the coordinator drops ``task_id``."""
        stop = threading.Event()
        alive = threading.Event()
        alive.set()
        beat = threading.Thread(target=self._heartbeat, args=(creds, task_id, stop, alive), daemon=True)
        beat.start()
        try:
            yield alive
        finally:
            stop.set()
            beat.join()

    def _heartbeat(self, creds: pb.Credentials, task_id: str, stop: threading.Event, alive: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            try:
                reply = self.stub.Heartbeat(pb.HeartbeatRequest(credentials=creds, task_id=task_id, status="working"),
                                            timeout=UNARY_DEADLINE_S, metadata=self._session())
                if not reply.task_alive:
                    alive.clear()
            except grpc.RpcError as exc:
                log.debug("heartbeat failed: %s", exc)

    def _upload(self, task_id: str, reply: Message, creds: pb.Credentials) -> bool:
        blob = self.encode_reply(reply)
        digest = sha256_hex(blob)

        def chunks() -> Iterator[pb.UploadChunk]:
            for i, (offset, piece) in enumerate(iter_chunks(blob)):
                if i == 0:
                    yield pb.UploadChunk(credentials=creds, task_id=task_id, total_size=len(blob), sha256=digest,
                                         offset=offset, data=piece)
                else:
                    yield pb.UploadChunk(offset=offset, data=piece)

        try:
            self._call("upload", lambda: self.stub.Upload(chunks(), timeout=STREAM_DEADLINE_S,
                                                          metadata=self._session()))
            log.debug("upload accepted (%.2f MB)", len(blob) / 1e6)
            return True
        except UserError as exc:
            # FAILED_PRECONDITION: the round moved on without us; keep polling
            log.warning("upload not accepted: %s", exc)
            return False
