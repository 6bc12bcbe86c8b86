"""The round engine's Driver over Flower's Grid: the simulation twin of the gRPC mailbox.

The engine says "send these messages to these clients, bring back what answers
before the deadline"; here that becomes one ``grid.send_and_receive`` call.
Each fedsite message travels as Flower records (simulations/flower_wire.py).
Client ids are ``client-<partition>``: the driver learns each node's
partition once, with a small ``query`` message, so sampling (seeded by client
id) is the same in every run of a job whatever node ids Flower draws.

Scale. Flower's simulation engine hands messages to its ClientApp workers
from a thread that, ten times a second, asks the link state for a message for
*every* node (``vce_api.add_messages_to_queue``); each ask scans every stored
message. With 10,000 enrolled clients and 100 in flight that thread alone is
10^6 checks per sweep, holding the GIL against the round, and the driver's
first-round discovery adds a hello message per enrolled node. Both grow with
the clients enrolled, not with those sampled. :class:`NodeDispatch` replaces
them for our own runs: the driver tells it which nodes it just sent to, it
asks the link state for those nodes only (the same public ``get_message_ins``
call, so TTLs and delivery marks behave as before), and it hands the driver
the engine's node-to-partition table, so no hello is needed. A simulation
whose ServerApp is not ours never registers and keeps Flower's own loop.

Replies. Flower's Grid has no way to wait for a reply: ``send_and_receive``
pulls every 0.1 s (``InMemoryGrid.pull_interval``), so each exchange ends up
to 0.1 s after its last reply, four times in a SecAgg+ round. With the
dispatch installed, the engine's injector thread (``put_message_into_state``,
replaced like the extractor) tells the dispatch each reply it stores, and the
dispatch wakes the driver (its ``replied`` event) once every reply the driver
awaits is stored, so the driver pulls once per exchange instead of on a clock.
(It used to be woken by each reply: a pull of the link state per reply, on
the driver's thread, holding the GIL just when the engine's worker thread
submits the next message to the actor, whose wait that lengthened.) The
driver still looks twice a second whether Flower's runtime stopped, and pulls
then too, so a reply that never passes the injector (an expired message's
error) is collected by the deadline as before.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable
from queue import Empty, Queue
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.serverapp import Grid

from coordinator.engine import Exchange
from protos.codec import CodecError, Message
from simulations.flower_wire import RECORD, encoded_size, pack, unpack

log = logging.getLogger("fedsite.simulation")

HELLO = "hello"  # query the driver sends once per node to learn its partition
PARTITION = "partition-id"
TRAIN_TYPE = "train"  # every fedsite stage rides as a Flower "train" message; the stage is in the payload
QUERY_TYPE = "query"


class SimulationDriverError(RuntimeError):
    """The simulated federation did not come up, or Flower's runtime stopped under the engine."""


def client_id_for(partition: int) -> str:
    return f"client-{partition:05d}"


# -- dispatch: the engine's message loop, for the nodes that have messages only ----------------------


class NodeDispatch:
    """Feeds the simulation engine's workers the messages of the nodes the driver sent to.

    One per simulation run, shared by the :class:`FlowerDriver` (ServerApp thread: :meth:`expect` after
    each push) and the engine's message-extractor thread (:meth:`run`, in place of Flower's poll of
    every node). A node stays on the list until it has been handed as many messages as were expected for
    it, or until a sweep that began after its last :meth:`expect` finds nothing more for it (a message
    that expired or was deleted), so a push racing with a sweep is never lost. (Each ask of the link
    state scans every message it stores, so a second sweep over all of a round's nodes just to find
    nothing costs ~K² checks, on the thread the engine's workers need the GIL from.) After handing over a
    message the sweep yields the GIL, so the worker waiting for it submits it to its actor at once
    rather than after the rest of the sweep.
    """

    def __init__(self, sweep_interval_s: float = 0.1) -> None:
        self.sweep_interval_s = sweep_interval_s  # Flower's own loop sweeps every 0.1 s
        self._lock = threading.Lock()
        # node id -> [sequence number of its latest expect(), messages expected and not handed over yet]
        self._wanted: dict[int, list[int]] = {}
        self._sequence = 0
        self._wake = threading.Event()
        self.ready = threading.Event()  # set once the engine has handed over its node table
        self.partition_of: dict[int, int] = {}  # Flower node id -> partition id (the engine's own table)
        # set by the engine's injector once it has stored the reply to every message in ``_awaited``
        self.replied = threading.Event()
        self._awaited: set[str] = set()  # ids of the driver's messages whose replies are not stored yet
        self.sweeps = 0
        self.asks = 0  # get_message_ins calls made (for tests: grows with messages, not with nodes)

    def await_replies(self, message_ids: Iterable[str]) -> None:
        """The driver waits for the replies to these messages (those of one exchange): :attr:`replied` is set
        once all are stored. Called before :meth:`expect`, so no reply can be stored before it is awaited."""
        with self._lock:
            self._awaited = set(message_ids)
            if not self._awaited:
                self.replied.set()

    def reply_stored(self, reply_to: str) -> None:
        """The engine's injector stored the reply to message ``reply_to``; wakes the driver if it was the last
        one awaited (a straggler of an earlier exchange wakes nobody)."""
        with self._lock:
            if reply_to in self._awaited:
                self._awaited.discard(reply_to)
                if not self._awaited:
                    self.replied.set()

    def expect(self, node_ids: Iterable[int]) -> None:
        """The driver has just stored messages for these nodes."""
        with self._lock:
            self._sequence += 1
            for node in node_ids:
                entry = self._wanted.setdefault(node, [0, 0])
                entry[0] = self._sequence
                entry[1] += 1
        self._wake.set()

    def run(self, state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        """The engine's extractor loop: move each expected node's next message into the workers' queue."""
        self.partition_of = dict(nodes_mapping)
        self.ready.set()
        while not f_stop.is_set():
            self._wake.clear()
            with self._lock:
                snapshot = [(node, entry[0]) for node, entry in self._wanted.items()]
            self.sweeps += 1
            for node, sequence in snapshot:
                self.asks += 1
                messages = state.get_message_ins(node_id=node, limit=1)
                for message in messages:
                    queue.put(message)
                with self._lock:
                    entry = self._wanted.get(node)
                    if entry is not None:
                        entry[1] -= len(messages)
                        # all it was expected to get is handed over, or nothing was left though no expect()
                        # came since the snapshot
                        if (messages and entry[1] <= 0) or (not messages and entry[0] == sequence):
                            del self._wanted[node]
                if messages:
                    time.sleep(0)  # let the worker waiting on the queue take the message now
            self._wake.wait(self.sweep_interval_s)


_DISPATCHES: dict[int, tuple[Any, NodeDispatch]] = {}  # id(link state) -> (that state, its dispatch)
_DISPATCH_LOCK = threading.Lock()
_FLOWER_EXTRACTOR: Callable[..., None] | None = None  # vce_api.add_messages_to_queue before install


def register_dispatch(state: Any) -> NodeDispatch:
    """A dispatch for the simulation whose link state is ``state`` (the Grid's and the engine's)."""
    dispatch = NodeDispatch()
    with _DISPATCH_LOCK:
        _DISPATCHES[id(state)] = (state, dispatch)
    return dispatch


def _dispatch_for(state: Any) -> NodeDispatch | None:
    with _DISPATCH_LOCK:
        entry = _DISPATCHES.get(id(state))
    return entry[1] if entry is not None and entry[0] is state else None


def _extract_messages(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Stands in for ``vce_api.add_messages_to_queue``: a run with a registered dispatch is served by it;
    any other keeps Flower's poll of every node, sweep by sweep, until (if ever) its driver registers."""
    assert _FLOWER_EXTRACTOR is not None
    try:
        while not f_stop.is_set():
            dispatch = _dispatch_for(state)
            if dispatch is not None:
                dispatch.run(state, queue, nodes_mapping, f_stop)
                return
            # one sweep of Flower's own loop (it returns once f_stop is set, so stop it after one sweep)
            for node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(0.1)
    finally:
        with _DISPATCH_LOCK:
            entry = _DISPATCHES.get(id(state))
            if entry is not None and entry[0] is state:
                del _DISPATCHES[id(state)]


def _store_replies(state: Any, queue: Queue[Any], f_stop: threading.Event) -> None:
    """Stands in for ``vce_api.put_message_into_state``: the same loop (store each reply the workers queue),
    and then tell the dispatch of a run that registered one (it wakes the driver once all it awaits are in)."""
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        dispatch = _dispatch_for(state)
        if dispatch is not None:
            dispatch.reply_stored(reply.metadata.reply_to_message_id)


def install_dispatch() -> bool:
    """Put :func:`_extract_messages` and :func:`_store_replies` in place of Flower's extractor and injector
    loops (once per process).

    False, with Flower's loops left alone, if this Flower's simulation engine does not have the loops
    these replace (names and parameters are checked); drivers then discover nodes with hellos and poll.
    """
    global _FLOWER_EXTRACTOR
    from flwr.server.superlink.fleet.vce import vce_api

    extractor = getattr(vce_api, "add_messages_to_queue", None)
    injector = getattr(vce_api, "put_message_into_state", None)
    if extractor is _extract_messages and injector is _store_replies:
        return True
    if (extractor is None or injector is None
            or list(inspect.signature(extractor).parameters) != ["state", "queue", "nodes_mapping", "f_stop"]
            or list(inspect.signature(injector).parameters) != ["state", "queue", "f_stop"]):
        log.warning("this Flower's simulation engine has no add_messages_to_queue(state, queue, nodes_mapping, "
                    "f_stop) and put_message_into_state(state, queue, f_stop); keeping its own message loops, "
                    "which poll every node")
        return False
    _FLOWER_EXTRACTOR = extractor
    vce_api.add_messages_to_queue = _extract_messages
    vce_api.put_message_into_state = _store_replies
    return True


class FlowerDriver:
    """:class:`coordinator.engine.Driver` over a Flower ``Grid`` (simulation or deployment)."""

    STOP_CHECK_S = 0.5  # with a dispatch, its last reply wakes the driver; it still looks at the runtime this often

    def __init__(self, grid: Grid, *, hello_timeout_s: float = 600.0, ttl_margin_s: float = 60.0,
                 runtime_stopped: threading.Event | None = None, pull_interval_s: float = 0.1,
                 dispatch: bool = False) -> None:
        self.grid = grid
        # with ``dispatch`` (and install_dispatch() done) on a simulation Grid, which exposes its link
        # state: messages reach the workers through a NodeDispatch, and node partitions come from the
        # engine's table instead of hellos
        state = getattr(grid, "state", None)
        self.dispatch = register_dispatch(state) if dispatch and state is not None else None
        self.hello_timeout_s = hello_timeout_s
        self.ttl_margin_s = ttl_margin_s
        # Set by whoever runs Flower once its runtime has returned (normally or not). Flower runs the
        # ServerApp in a non-daemon thread it never joins: without this, an engine waiting for clients
        # of a dead runtime keeps the process alive (and its log busy) until every deadline has passed.
        self.runtime_stopped = runtime_stopped or threading.Event()
        self.pull_interval_s = pull_interval_s
        self.hellos_sent = 0  # discovery messages (none when the dispatch supplies the partitions)
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
        self.hellos_sent += len(hellos)
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

    def _learn_partitions(self, node_ids: Iterable[int]) -> None:
        """The partitions of nodes not yet known, from the engine's own table (no message sent)."""
        assert self.dispatch is not None
        for node in set(node_ids) - set(self.client_of):
            partition = self.dispatch.partition_of.get(node)
            if partition is not None:
                cid = client_id_for(partition)
                self.node_of[cid] = node
                self.client_of[node] = cid

    def _dispatch_ready(self) -> bool:
        """Wait (bounded) for the engine to hand its node table to the dispatch; False = use hellos."""
        if self.dispatch is None:
            return False
        deadline = time.monotonic() + self.hello_timeout_s
        while not self.dispatch.ready.wait(0.2):
            self._check_runtime()
            if time.monotonic() >= deadline:
                log.warning("the simulation engine did not start the fedsite dispatch; discovering nodes by hello")
                self.dispatch = None
                return False
        return True

    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_runtime()
            if self._dispatch_ready():
                self._learn_partitions(self.grid.get_node_ids())
            else:
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
        if self.dispatch is not None:
            self.dispatch.await_replies(pending)
            self.dispatch.expect(message.metadata.dst_node_id for message in messages)
        replies: list[FlowerMessage] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:  # as Grid.send_and_receive: no pull past the deadline
            if self.dispatch is not None:
                self.dispatch.replied.clear()  # before the pull: a reply stored after it sets it again
            answered = list(self.grid.pull_messages(pending))
            replies.extend(answered)
            pending -= {reply.metadata.reply_to_message_id for reply in answered}
            if not pending:
                break
            if self.dispatch is not None:  # woken once all replies are stored; the stop is checked twice a second
                self.dispatch.replied.wait(min(self.STOP_CHECK_S, max(deadline - time.monotonic(), 0.0)))
                self._check_runtime()
            elif self.runtime_stopped.wait(self.pull_interval_s):
                self._check_runtime()
        return replies

    # -- one exchange ----------------------------------------------------------------------

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        failures: dict[str, str] = {}
        outgoing: list[FlowerMessage] = []
        bytes_down = 0
        packed: dict[int, tuple[RecordDict, int]] = {}  # one encoding per distinct message
        arrays: dict[int, tuple[Any, Any]] = {}  # and per distinct tensor (flower_wire.pack)
        for cid, message in messages.items():
            node = self.node_of.get(cid)
            if node is None:
                failures[cid] = "unknown client (not a node of this simulation)"
                continue
            if id(message) not in packed:
                packed[id(message)] = pack(message, arrays), encoded_size(message)
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
                message = unpack(reply.content)
                size = encoded_size(message)
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
