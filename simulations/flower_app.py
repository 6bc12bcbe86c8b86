"""The Flower apps of a fedsite simulation: a ServerApp that runs the round engine, a ClientApp that runs the client.

The ServerApp does not use a Flower strategy: it hands a :class:`FlowerDriver`
over its ``Grid`` to our :class:`~coordinator.engine.RoundEngine`, which owns
sampling, quorum, aggregation, evaluation and checkpoints, exactly as when the
gRPC servicer drives it.

The ClientApp answers two kinds of message: the driver's one-off ``query``
(which partition is this node?) and ``train`` messages carrying a fedsite
message, handed to a :class:`~client.runtime.ClientRuntime` like the gRPC
agent does. Each Ray actor process serves many virtual clients one after the
other, so what is heavy is loaded once per process and shared: the model of
the job package (every train message sets all trainable tensors, so reusing
it across clients is safe), the training file and the partition table. What
is per client (its encoded examples, and the ClientRuntime over them) lives in
a small LRU, so an actor's memory does not grow with the number of enrolled
clients. A client's durable state (privacy ledger, ...) lives under
``<output_dir>/clients/<partition>/`` and its in-round secure aggregation
state in its node's Flower Context; an actor reuses the runtime it kept for a
node only while that Context shows no other actor has served the node since
(see :func:`node_runtime`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from localio.allocator import reuse_freed_memory_by_default
from protos.codec import Message
from simulations.flower_backend import install_pipelined_backend
from simulations.flower_driver import HELLO, PARTITION, FlowerDriver, install_dispatch
from simulations.flower_wire import RECORD, pack, unpack

log = logging.getLogger("fedsite.simulation")

PARTITION_ID_KEY = "partition-id"  # what Flower's simulation engine puts in context.node_config


@dataclass(frozen=True)
class ClientSettings:
    """Everything a virtual client needs besides its partition id (small: shipped to every actor)."""

    package_dir: str  # the unpacked job package the coordinator built
    train_data: str  # one JSONL/CSV file split among the clients
    partitions_file: str  # JSON: for each partition, the row indices of train_data it owns
    output_dir: str  # client state goes to <output_dir>/clients/<partition>/
    threads: int = 1  # torch threads per actor (match the actor's num_cpus)
    cache_clients: int = 8  # encoded client datasets kept per actor (LRU)
    prefix_cache_dir: str = ""  # frozen-prefix states shared by the virtual clients (and later runs); "" = each
    # client's state folder


class _ActorState:
    """Per-process cache shared by all virtual clients an actor serves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads_set = False
        self.loaded: dict[str, tuple[Any, Any, Any]] = {}  # package dir -> (model, tokenizer, spec)
        self.examples: dict[str, list[Any]] = {}  # train file -> all its examples
        self.partitions: dict[str, list[list[int]]] = {}  # partitions file -> row indices per client
        self.data: OrderedDict[tuple[str, int], Any] = OrderedDict()  # (package, partition) -> encoded data
        # (package, output dir, partition) -> (serial it left in the node's Context, its ClientRuntime); only for
        # partitions whose data is in ``data``, so the LRU bounds both
        self.runtimes: dict[tuple[str, str, int], tuple[int, Any]] = {}
        self.token = uuid.uuid4().hex  # names this process in the Contexts it leaves

    def clear(self) -> None:
        with self.lock:
            self.loaded.clear()
            self.examples.clear()
            self.partitions.clear()
            self.data.clear()
            self.runtimes.clear()


_STATE = _ActorState()


def actor_cache_sizes() -> dict[str, int]:
    """How much this process holds (for tests and the scale benchmark)."""
    return {"models": len(_STATE.loaded), "train_files": len(_STATE.examples), "datasets": len(_STATE.data)}


def _package(settings: ClientSettings) -> tuple[Any, Any, Any]:
    """The job package's (model, tokenizer, spec), loaded once per process (and torch's threads and malloc set)."""
    import torch

    from emulator.package import load_trainable_model

    state = _STATE
    if not state.threads_set:
        torch.set_num_threads(max(1, settings.threads))
        reuse_freed_memory_by_default()  # an actor's buffers of a few MB per client (localio/allocator.py)
        state.threads_set = True
    if settings.package_dir not in state.loaded:
        state.loaded.clear()  # one job per process at a time
        state.data.clear()
        state.runtimes.clear()
        state.loaded[settings.package_dir] = load_trainable_model(Path(settings.package_dir))
    return state.loaded[settings.package_dir]


def _encoded_data(settings: ClientSettings, partition: int) -> Any:
    """One virtual client's encoded examples, from the actor's LRU (loads what the process lacks)."""
    from emulator.tasks import encode
    from localio.data import check_labels, read_examples

    state = _STATE
    key = (settings.package_dir, partition)
    if key in state.data:
        state.data.move_to_end(key)
        return state.data[key]
    _, tokenizer, spec = _package(settings)
    if settings.train_data not in state.examples:
        state.examples.clear()
        state.examples[settings.train_data] = read_examples(settings.train_data,
                                                            need_label=spec.task == "classification")
    if settings.partitions_file not in state.partitions:
        state.partitions.clear()
        state.partitions[settings.partitions_file] = json.loads(Path(settings.partitions_file).read_text())
    table = state.partitions[settings.partitions_file]
    if not 0 <= partition < len(table):
        raise ValueError(f"partition {partition} is outside the {len(table)} partitions of this simulation")
    rows = state.examples[settings.train_data]
    examples = [rows[i] for i in table[partition]]
    if spec.task == "classification":
        check_labels(examples, spec.labels, f"{settings.train_data} (partition {partition})")
    label2id = {label: i for i, label in enumerate(spec.labels)}
    data = encode(examples, tokenizer, task=spec.task, max_length=spec.max_length, label2id=label2id)
    state.data[key] = data
    while len(state.data) > max(1, settings.cache_clients):
        (package, evicted), _ = state.data.popitem(last=False)
        for cached in [k for k in state.runtimes if k[0] == package and k[2] == evicted]:
            del state.runtimes[cached]
    return data


def client_runtime(settings: ClientSettings, partition: int) -> Any:
    """A fresh ClientRuntime of one virtual client on the actor's shared model.

    Whatever a runtime keeps about its client (the privacy ledger it read,
    secure-aggregation secrets) goes stale in this process once the same client
    is served by another actor, so a kept runtime is reused only under the
    check of :func:`node_runtime`; a fresh one re-reads durable state from
    ``<output_dir>/clients/<partition>/``, and in-round secure aggregation
    state travels in the node's Flower Context (see below).
    """
    from client.runtime import ClientRuntime

    model, _, spec = _package(settings)
    state_dir = Path(settings.output_dir) / "clients" / str(partition)
    state_dir.mkdir(parents=True, exist_ok=True)
    # the examples are encoded (or taken from the LRU) only when a message trains: the SecAgg+ key
    # agreement stages, a fresh runtime each (see node_runtime), never read them
    return ClientRuntime(model=model, spec=spec, load_data=lambda: _encoded_data(settings, partition),
                         state_dir=state_dir,
                         prefix_cache_dir=Path(settings.prefix_cache_dir) if settings.prefix_cache_dir else None)


# -- secure aggregation state between stages -----------------------------------------------------
# The stages of one SecAgg+ round reach a client as separate messages, and Ray may hand them to
# different actors, so the client's protocol state cannot stay in process memory. Like Flower's
# own secaggplus_mod, it is kept in the node's Context (context.state), which the simulation engine
# stores per node and passes with each message: encoded as JSON with private keys as raw bytes.

SECAGG_RECORD = "fedsite.secagg"


def _to_plain(value: Any) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    if isinstance(value, X25519PrivateKey):
        return {"x25519": value.private_bytes_raw().hex()}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, tuple | list):
        return {"tuple" if isinstance(value, tuple) else "list": [_to_plain(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_to_plain(k), _to_plain(v)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot carry a {type(value).__name__} in the secure aggregation state")


def _from_plain(value: Any) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "x25519":
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(inner))
    if tag == "bytes":
        return bytes.fromhex(inner)
    if tag == "tuple":
        return tuple(_from_plain(v) for v in inner)
    if tag == "list":
        return [_from_plain(v) for v in inner]
    return {_from_plain(k): _from_plain(v) for k, v in inner}


def save_secagg_state(runtime: Any, context: Context) -> None:
    client = getattr(runtime, "secagg", None)
    if client is None:
        return
    fields = {f.name: _to_plain(getattr(client.state, f.name)) for f in dataclasses.fields(client.state)}
    blob = json.dumps({"client_id": client.client_id, "state": fields}).encode()
    context.state[SECAGG_RECORD] = ConfigRecord({"blob": blob})


def restore_secagg_state(runtime: Any, context: Context) -> None:
    record = context.state.config_records.get(SECAGG_RECORD)
    if record is None:
        return
    from privacy.secagg import SecAggPlusClient
    from privacy.secagg.client import SecAggClientState

    saved = json.loads(record["blob"])  # type: ignore[arg-type]
    client = SecAggPlusClient(int(saved["client_id"]))
    client.state = SecAggClientState(**{k: _from_plain(v) for k, v in saved["state"].items()})
    runtime.secagg = client


def handle_query(settings: ClientSettings, message: FlowerMessage, context: Context) -> FlowerMessage:
    """The driver's hello: answer with this node's partition id (loads nothing)."""
    record = message.content.config_records.get(RECORD)
    if record is None or not record.get(HELLO):
        raise ValueError("unknown query (expected the fedsite hello)")
    partition = int(context.node_config[PARTITION_ID_KEY])
    return FlowerMessage(RecordDict({RECORD: ConfigRecord({PARTITION: partition})}), reply_to=message)


def handle_train(settings: ClientSettings, message: FlowerMessage, context: Context) -> FlowerMessage:
    """One fedsite message in, one out: the same ClientRuntime.handle the gRPC agent calls."""
    incoming = unpack(message.content)
    return FlowerMessage(pack(handle_message(settings, incoming, context)), reply_to=message)


NODE_RECORD = "fedsite.node"  # context.state: which process served the node last, and a serial per message


def node_runtime(settings: ClientSettings, partition: int, context: Context) -> tuple[Any, int]:
    """The ClientRuntime for the node of ``context``, and the serial its next Context should carry.

    The runtime this process kept for the node, if the Context still names this process and the
    serial it left there: no other actor has served the node since, so the runtime's privacy ledger
    and SecAgg+ state are the node's current ones. Otherwise a fresh runtime (ledger re-read from the
    client's state folder, SecAgg+ state restored from the Context), as for every message before.
    """
    record = context.state.config_records.get(NODE_RECORD)
    serial = record.get("serial") if record is not None else None
    serial = serial if isinstance(serial, int) else 0
    key = (settings.package_dir, settings.output_dir, partition)
    cached = _STATE.runtimes.get(key)
    if (cached is not None and record is not None and record.get("holder") == _STATE.token
            and cached[0] == serial and (settings.package_dir, partition) in _STATE.data):
        _STATE.data.move_to_end((settings.package_dir, partition))
        return cached[1], serial + 1
    runtime = client_runtime(settings, partition)
    restore_secagg_state(runtime, context)
    return runtime, serial + 1


def handle_message(settings: ClientSettings, incoming: Message, context: Context) -> Message:
    """The virtual client of ``context``'s node handles one fedsite message."""
    partition = int(context.node_config[PARTITION_ID_KEY])
    key = (settings.package_dir, settings.output_dir, partition)
    with _STATE.lock:  # an actor runs one message at a time; the lock guards threaded backends
        runtime, serial = node_runtime(settings, partition, context)
        try:
            reply: Message = runtime.handle(incoming)
            save_secagg_state(runtime, context)
        except BaseException:
            _STATE.runtimes.pop(key, None)  # Flower keeps the node's old Context: this runtime is ahead of it
            raise
        context.state[NODE_RECORD] = ConfigRecord({"holder": _STATE.token, "serial": serial})
        if (settings.package_dir, partition) in _STATE.data:
            _STATE.runtimes[key] = (serial, runtime)
    return reply


class FedsiteClientApp(ClientApp):
    """A ClientApp bound to one simulation's settings, which pickles as (its settings, a module function).

    Flower's Ray backend sends the ClientApp along with every message (inside the loader it hands each
    actor task), so a plain ClientApp, whose handlers are closures, was pickled by value each time (their
    code, cloudpickled) and rebuilt in the actor for each message. This one travels as its settings and
    is rebuilt once per process (:func:`client_app_for`); the caches stay per process as before.
    """

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__()
        self.settings = settings

        @self.query()
        def query(message: FlowerMessage, context: Context) -> FlowerMessage:
            return handle_query(settings, message, context)

        @self.train()
        def train(message: FlowerMessage, context: Context) -> FlowerMessage:
            return handle_train(settings, message, context)

    def __reduce__(self) -> tuple[Callable[[ClientSettings], FedsiteClientApp], tuple[ClientSettings]]:
        return client_app_for, (self.settings,)


_APPS: dict[ClientSettings, FedsiteClientApp] = {}  # this process's ClientApp per simulation (one at a time)


def client_app_for(settings: ClientSettings) -> FedsiteClientApp:
    """This process's ClientApp for ``settings`` (what a pickled :class:`FedsiteClientApp` becomes)."""
    app = _APPS.get(settings)
    if app is None:
        _APPS.clear()  # one simulation per process at a time, like the actor's caches
        app = _APPS[settings] = FedsiteClientApp(settings)
    return app


def make_client_app(settings: ClientSettings) -> ClientApp:
    """A ClientApp bound to one simulation's settings (pickles as its settings; the caches stay per process)."""
    return FedsiteClientApp(settings)


def make_server_app(run_engine: Callable[[FlowerDriver], None], *, hello_timeout_s: float = 600.0,
                    runtime_stopped: threading.Event | None = None) -> ServerApp:
    """A ServerApp whose main hands the round engine a FlowerDriver over its Grid; no Flower strategy.

    ``runtime_stopped`` (set by the caller once ``run_simulation`` returns) makes the driver give up
    instead of waiting out its deadlines.
    """
    # Flower's engine otherwise polls every enrolled node ten times a second (see flower_driver's docstring)
    dispatch = install_dispatch()
    install_pipelined_backend()  # and feeds each Ray actor its next message while it runs one (flower_backend)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_engine(FlowerDriver(grid, hello_timeout_s=hello_timeout_s, runtime_stopped=runtime_stopped,
                                dispatch=dispatch))

    return app
