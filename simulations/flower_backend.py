"""Flower's Ray backend, with each actor given its next message while it runs the current one.

Flower's simulation engine runs one worker thread per Ray actor; a worker takes a
message, hands it to an idle actor (``BasicActorPool.submit`` pops the actor off
the idle list), blocks on ``ray.get`` for the reply, and only then takes the
next message. So an actor idles between two messages for the whole way there
and back: the worker pickling the message and its Context, Ray carrying them to
the actor process and the reply back, the worker unpickling the reply and
queueing it, and taking the next message off the queue. With a small client
(~10 ms of training) that round trip was a third of the client's time again
(issue 16: simulated ÷ direct per client 1.35-1.45×).

:class:`PipelinedRayBackend` keeps up to :data:`PIPELINE_DEPTH` messages in
flight per actor: twice as many worker threads, each sending its message to
the actor with the fewest in flight. A Ray actor runs its calls one at a time
in the order they were sent, so the second waits in the actor's queue and
starts as soon as the first ends; the driver's half of each round trip
overlaps the actor's work instead of adding to it. What an actor runs is
unchanged (one message at a time, its caches and the node's Context as
before); what changes is that a message can wait at the actor instead of in
the engine's queue, so at most :data:`PIPELINE_DEPTH` messages (the round's
train message and its Context, each) sit in an actor's queue. Measured with
``python -m simulations.bench.scale --only-overhead``, interleaved with
Flower's backend on quiet cores: simulated ÷ direct per client 1.43× → 1.21×.

Two messages for the same node are never in flight together in fedsite runs
(the round engine sends a node one message per exchange and waits for the
exchange to end), as with Flower's own backend, whose several worker threads
could equally run one node's messages on two actors.

``install_pipelined_backend`` puts the class where Flower's engine looks for
its Ray backend (``raybackend.RayBackend``, imported when a simulation
starts). It checks the backend's methods are the ones this overrides; if not,
Flower's backend stays.

Worker threads. Flower's engine starts its ``num_workers`` worker loops in a
default ``ThreadPoolExecutor()``, which holds at most min(32, CPUs + 4)
threads; a loop past that never starts. With one loop per actor that already
idled actors past 32; with two per actor it would leave actors unpipelined
from five actors on (8 cores: 12 of 16 loops). The install also gives the
engine's module an executor that makes one thread per submitted loop
(:class:`ThreadPerWorker`), so every loop runs whatever the actor count.
"""

from __future__ import annotations

import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import BackendConfig, raybackend
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

log = logging.getLogger("fedsite.simulation")

PIPELINE_DEPTH = 2  # messages in flight per actor: the one it runs and the next
WORKER_THREADS_CAP = 4096  # threads ThreadPerWorker may make (Flower submits one long-running loop per worker)


class ThreadPerWorker(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose default cap is high enough that every submitted task gets its own thread.

    An executor makes threads only as tasks are submitted (one per task while below its cap), so with a
    high cap Flower's engine gets exactly one thread per worker loop it submits, as it assumes.
    """

    def __init__(self, max_workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(max_workers or WORKER_THREADS_CAP, *args, **kwargs)


class PipelinedRayBackend(RayBackend):
    """Flower's RayBackend with up to :data:`PIPELINE_DEPTH` messages in flight per actor (module docstring)."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._in_flight: dict[int, int] = {}  # id(actor) -> messages sent to it and not answered yet
        self._flight_lock = threading.Lock()

    @property
    def num_workers(self) -> int:
        """One worker thread per message that may be in flight."""
        return self.pool.num_actors * PIPELINE_DEPTH if self.pool else 0

    def _take_actor(self) -> Any:
        assert self.pool is not None
        with self._flight_lock:
            # every actor stays on the pool's list: this backend never pops one, it counts what each holds
            actor = min(self.pool.pool, key=lambda a: self._in_flight.get(id(a), 0))
            self._in_flight[id(actor)] = self._in_flight.get(id(actor), 0) + 1
            return actor

    def _release_actor(self, actor: Any) -> None:
        with self._flight_lock:
            self._in_flight[id(actor)] -= 1

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` in the least-busy actor; the reply and the node's updated Context."""
        if self.pool is None or not self.pool.pool:
            raise ValueError("The actor pool is empty, unfit to process messages.")
        if self.app_fn is None:
            raise ValueError("Unspecified function to load a `ClientApp`. "
                             "Call the backend's `build()` method before processing messages.")
        partition_id = context.node_config[PARTITION_ID_KEY]
        actor = self._take_actor()
        try:
            _, reply, updated_context = ray.get(actor.run.remote(self.app_fn, message, str(partition_id), context))
        finally:
            self._release_actor(actor)
        return reply, updated_context


_RELIED_ON = ("num_workers", "process_message", "build", "terminate")  # what the subclass overrides or calls


def install_pipelined_backend() -> bool:
    """Make Flower's simulation engine use :class:`PipelinedRayBackend` (once per process).

    False, with Flower's backend left alone, if this Flower's ``RayBackend`` lacks what the subclass
    relies on (``process_message(message, context)``, ``num_workers``, a ``pool`` built by ``build``).
    """
    current = raybackend.RayBackend
    if current is PipelinedRayBackend:
        return True
    process = getattr(current, "process_message", None)
    if (current is not RayBackend or any(not hasattr(current, name) for name in _RELIED_ON) or process is None
            or list(inspect.signature(process).parameters) != ["self", "message", "context"]):
        log.warning("this Flower's RayBackend is not the one fedsite's pipelined backend extends; keeping it "
                    "(one message in flight per actor)")
        return False
    raybackend.RayBackend = PipelinedRayBackend  # type: ignore[misc]
    if getattr(vce_api, "ThreadPoolExecutor", None) is ThreadPoolExecutor:  # see "Worker threads" above
        vce_api.ThreadPoolExecutor = ThreadPerWorker  # type: ignore[misc]
    return True
