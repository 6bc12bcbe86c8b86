"""The gRPC driver of the round engine: a mailbox that clients pull from.

The engine posts one task per sampled client and waits; clients find their
task when they poll, fetch its bytes, and upload a reply. A task ends when its
reply arrives, when its client goes silent for longer than the heartbeat
timeout (a crashed client), or at the round deadline. Each task id is single
use: a reply to a task that is no longer open is refused, so replays and late
stragglers cannot leak into another round.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from coordinator.engine import Exchange
from coordinator.registry import ClientRegistry
from protos.codec import CodecError, Message, decode_message, encode_message, sha256_hex
from protos.wire import Stage

REPLY_STAGES_ALWAYS_ALLOWED = (Stage.DECLINED, Stage.ERROR)


class TaskError(Exception):
    """A client call about a task that is unknown, closed or not this client's."""


class ReplyInvalid(ValueError):
    """A reply that cannot be decoded or does not answer its task."""


@dataclass
class Task:
    """One client's work for one round: the encoded message, its deadline, and the reply once it arrives."""
    task_id: str
    client_id: str
    round: int
    stage: str
    blob: bytes
    sha256: str
    deadline: float  # time.monotonic() when the engine stops waiting
    max_reply_bytes: int
    bytes_sent: int = 0
    reply: Message | None = None
    reply_bytes: int = 0


class Mailbox:
    """The gRPC :class:`Driver`: the engine posts tasks and waits, the servicer hands them out and
    delivers replies. One lock and condition guard the open tasks, so both sides may block on it.
    """
    def __init__(self, registry: ClientRegistry, *, heartbeat_timeout_s: float,
                 min_reply_limit: int = 16 * 1024 * 1024) -> None:
        self.registry = registry
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.min_reply_limit = min_reply_limit
        self._cond = threading.Condition()
        self._open: dict[str, Task] = {}  # client_id -> its open task
        self.done_reason: str | None = None

    # -- engine side (Driver) -------------------------------------------------------------

    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        """Clients heard from within the heartbeat timeout, once ``count`` are (or at ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            active = self.registry.active(self.heartbeat_timeout_s)
            if len(active) >= count or time.monotonic() >= deadline:
                return active
            time.sleep(0.2)

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        """Post each client its message and wait for replies until all answered, went silent, or the deadline.

        Identical messages are encoded once. Every task is closed on return, so a late reply is refused
        rather than counted in the next round.
        """
        deadline = time.monotonic() + timeout_s
        tasks: dict[str, Task] = {}
        encoded: dict[int, bytes] = {}  # one encoding per distinct message (often all clients share one)
        with self._cond:
            for client_id, message in messages.items():
                if id(message) not in encoded:
                    encoded[id(message)] = encode_message(message)
                blob = encoded[id(message)]
                tasks[client_id] = Task(
                    task_id=secrets.token_hex(16), client_id=client_id, round=round_id,
                    stage=message.stage, blob=blob, sha256=sha256_hex(blob), deadline=deadline,
                    max_reply_bytes=max(2 * len(blob) + (1 << 20), self.min_reply_limit),
                )
            self._open.update(tasks)
            self._cond.notify_all()
            failures: dict[str, str] = {}
            while True:
                now = time.monotonic()
                waiting = [t for t in tasks.values() if t.reply is None and t.client_id not in failures]
                for task in waiting:
                    silent = now - self.registry.last_seen.get(task.client_id, -1e18)
                    if silent > self.heartbeat_timeout_s:
                        failures[task.client_id] = f"silent for {silent:.0f}s (heartbeat timeout)"
                        self._close(task)  # a late upload is refused, not counted as completed and dropped
                waiting = [t for t in waiting if t.client_id not in failures]
                if not waiting:
                    break
                if now >= deadline:
                    for task in waiting:
                        failures[task.client_id] = "no reply before the round deadline"
                    break
                self._cond.wait(timeout=min(0.5, deadline - now))
            for task in tasks.values():
                self._close(task)
        replies = {cid: t.reply for cid, t in tasks.items() if t.reply is not None and cid not in failures}
        return Exchange(
            replies=replies,
            failures=failures,
            bytes_down=sum(t.bytes_sent for t in tasks.values()),
            bytes_up=sum(t.reply_bytes for t in tasks.values()),
        )

    def _close(self, task: Task) -> None:
        """Stop accepting anything for ``task`` (caller holds the lock)."""
        if self._open.get(task.client_id) is task:
            del self._open[task.client_id]

    def close(self, reason: str) -> None:
        """Every later poll is told the job is done."""
        with self._cond:
            self.done_reason = reason
            self._cond.notify_all()

    # -- servicer side --------------------------------------------------------------------

    def open_task(self, client_id: str) -> Task | None:
        """The client's unanswered task, if any (what its next poll is told)."""
        with self._cond:
            task = self._open.get(client_id)
            return task if task is not None and task.reply is None else None

    def task(self, client_id: str, task_id: str) -> Task:
        """The open task ``task_id`` of ``client_id``, or TaskError: ids are compared in constant time."""
        with self._cond:
            task = self._open.get(client_id)
        if task is None or not secrets.compare_digest(task.task_id.encode(), task_id.encode()):
            raise TaskError("no such open task for this client (finished, expired or never issued)")
        return task

    def count_sent(self, task: Task, n: int) -> None:
        """Count bytes streamed for ``task``: the round's bytes down include resumed and repeated downloads."""
        with self._cond:
            task.bytes_sent += n

    def deliver(self, client_id: str, task_id: str, blob: bytes) -> None:
        """Accept a reply for an open task after checking its round and stage; a second reply is refused."""
        task = self.task(client_id, task_id)
        if task.reply is not None:
            raise TaskError("this task was already answered (replayed upload?)")
        try:
            message = decode_message(blob)
        except CodecError as exc:
            raise ReplyInvalid(str(exc)) from exc
        if message.round != task.round:
            raise ReplyInvalid(f"reply is for round {message.round}, the task is round {task.round}")
        if message.stage != task.stage and message.stage not in REPLY_STAGES_ALWAYS_ALLOWED:
            raise ReplyInvalid(f"reply stage {message.stage!r} does not answer a {task.stage!r} task")
        with self._cond:
            if self._open.get(client_id) is not task or task.reply is not None:
                raise TaskError("task closed while the upload was in flight")
            task.reply = message
            task.reply_bytes = len(blob)
            self._cond.notify_all()

    def heartbeat(self, client_id: str, task_id: str) -> bool:
        """True while the coordinator still waits for ``task_id`` (or no task is named)."""
        if not task_id:
            return True
        with self._cond:
            task = self._open.get(client_id)
            return task is not None and task.task_id == task_id and task.reply is None
