"""The round engine's Driver over Flower's Grid: the simulation twin of the gRPC mailbox.

The engine says "send these messages to these clients, bring back what answers
before the deadline"; here that becomes one ``grid.send_and_receive`` call.
Each fedsite :class:`~protos.codec.Message` travels as the exact bytes the gRPC
driver moves (``encode_message``), inside a Flower ``ConfigRecord``, so both
drivers carry byte-identical payloads and count ``bytes_down``/``bytes_up``
the same way. Client ids are ``client-<partition>``: the driver learns each
node's partition once, with a small ``query`` message, so sampling (seeded by
client id) is the same in every run of a job whatever node ids Flower draws.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.serverapp import Grid

from coordinator.engine import Exchange
from protos.codec import CodecError, Message, decode_message, encode_message

log = logging.getLogger("fedsite.simulation")

RECORD = "fedsite"  # the ConfigRecord that carries a fedsite message
BLOB = "message"  # its one key: encode_message(...) bytes
HELLO = "hello"  # query the driver sends once per node to learn its partition
PARTITION = "partition-id"
TRAIN_TYPE = "train"  # every fedsite stage rides as a Flower "train" message; the stage is in the payload
QUERY_TYPE = "query"


class SimulationDriverError(RuntimeError):
    """The simulated federation did not come up, or Flower's runtime stopped under the engine."""


def client_id_for(partition: int) -> str:
    return f"client-{partition:05d}"


def pack(message: Message) -> tuple[RecordDict, int]:
    """A fedsite message as Flower content, and the size of the bytes it carries."""
    blob = encode_message(message)
    return RecordDict({RECORD: ConfigRecord({BLOB: blob})}), len(blob)


def unpack(content: RecordDict) -> tuple[Message, int]:
    """The fedsite message inside Flower content; CodecError if it is not one."""
    record = content.config_records.get(RECORD)
    blob = record.get(BLOB) if record is not None else None
    if not isinstance(blob, bytes):
        raise CodecError(f"Flower message carries no {RECORD}.{BLOB} bytes")
    return decode_message(blob), len(blob)


class FlowerDriver:
    """:class:`coordinator.engine.Driver` over a Flower ``Grid`` (simulation or deployment)."""

    def __init__(self, grid: Grid, *, hello_timeout_s: float = 600.0, ttl_margin_s: float = 60.0,
                 runtime_stopped: threading.Event | None = None, pull_interval_s: float = 0.1) -> None:
        self.grid = grid
        self.hello_timeout_s = hello_timeout_s
        self.ttl_margin_s = ttl_margin_s
        # Set by whoever runs Flower once its runtime has returned (normally or not). Flower runs the
        # ServerApp in a non-daemon thread it never joins: without this, an engine waiting for clients
        # of a dead runtime keeps the process alive (and its log busy) until every deadline has passed.
        self.runtime_stopped = runtime_stopped or threading.Event()
        self.pull_interval_s = pull_interval_s
        self.node_of: dict[str, int] = {}  # client id -> Flower node id
        self.client_of: dict[int, str] = {}  # Flower node id -> client id

    # -- discovery -------------------------------------------------------------------------

    def _discover(self, node_ids: Iterable[int]) -> None:
        """Ask every node not yet known for its partition id."""
        unknown = sorted(set(node_ids) - set(self.client_of))
        if not unknown:
            return
        ttl = self.hello_timeout_s + self.ttl_margin_s
        hellos = [
            FlowerMessage(RecordDict({RECORD: ConfigRecord({HELLO: True})}), node, QUERY_TYPE,
                          ttl=ttl, group_id="hello")
            for node in unknown
        ]
        replies = self._send_and_receive(hellos, self.hello_timeout_s)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d failed the hello: %s", node, reply.error.reason)
                continue
            record = reply.content.config_records.get(RECORD)
            partition = record.get(PARTITION) if record is not None else None
            if not isinstance(partition, int):
                log.warning("node %d answered the hello without a partition id", node)
                continue
            cid = client_id_for(partition)
            self.node_of[cid] = node
            self.client_of[node] = cid

    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_runtime()
            self._discover(self.grid.get_node_ids())
            if len(self.node_of) >= count or time.monotonic() >= deadline:
                return sorted(self.node_of)
            self.runtime_stopped.wait(0.5)

    # -- transport ---------------------------------------------------------------------------

    def _check_runtime(self) -> None:
        if self.runtime_stopped.is_set():
            raise SimulationDriverError("Flower's simulation runtime has stopped; the round engine cannot go on")

    def _send_and_receive(self, messages: list[FlowerMessage], timeout_s: float) -> list[FlowerMessage]:
        """``Grid.send_and_receive``, but it gives up as soon as Flower's runtime stops."""
        self._check_runtime()
        pending = set(self.grid.push_messages(messages))  # a refused message (the grid logs why) gets no id
        replies: list[FlowerMessage] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:  # as Grid.send_and_receive: no pull past the deadline
            answered = list(self.grid.pull_messages(pending))
            replies.extend(answered)
            pending -= {reply.metadata.reply_to_message_id for reply in answered}
            if pending and self.runtime_stopped.wait(self.pull_interval_s):
                self._check_runtime()
        return replies

    # -- one exchange ----------------------------------------------------------------------

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        failures: dict[str, str] = {}
        outgoing: list[FlowerMessage] = []
        bytes_down = 0
        packed: dict[int, tuple[RecordDict, int]] = {}  # one encoding per distinct message
        for cid, message in messages.items():
            node = self.node_of.get(cid)
            if node is None:
                failures[cid] = "unknown client (not a node of this simulation)"
                continue
            if id(message) not in packed:
                packed[id(message)] = pack(message)
            content, size = packed[id(message)]
            outgoing.append(FlowerMessage(content, node, TRAIN_TYPE, ttl=timeout_s + self.ttl_margin_s,
                                          group_id=str(round_id)))
            bytes_down += size
        replies: dict[str, Message] = {}
        bytes_up = 0
        for reply in self._send_and_receive(outgoing, timeout_s):
            sender = self.client_of.get(reply.metadata.src_node_id)
            if sender is None or sender not in messages:
                continue  # a straggler from another exchange
            if reply.has_error():
                failures[sender] = f"client error: {reply.error.reason}"
                continue
            try:
                message, size = unpack(reply.content)
            except CodecError as exc:
                failures[sender] = f"undecodable reply: {exc}"
                continue
            if message.round != round_id:
                failures[sender] = f"reply is for round {message.round}, not {round_id}"
                continue
            replies[sender] = message
            bytes_up += size
        for cid in messages:
            if cid not in replies and cid not in failures:
                failures[cid] = "no reply before the round deadline"
        return Exchange(replies=replies, failures=failures, bytes_down=bytes_down, bytes_up=bytes_up)
