"""The FlowerDriver gives up as soon as Flower's runtime has stopped.

Flower runs the ServerApp in a thread it never joins; when its runtime ends
first (Ray failing under the engine, an interrupt), an engine still waiting for
clients would hold the process open until every deadline had passed: a CI run
once hung this way at interpreter exit. A dying Ray runtime cannot be provoked
on cue, so the grid here is the smallest honest ``flwr.serverapp.Grid``: its
nodes exist and never answer, as after a crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import Message as FlowerMessage
from flwr.app import RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from protos.codec import Message
from protos.wire import Stage
from simulations.flower_driver import FlowerDriver, SimulationDriverError, client_id_for

STOP_AFTER_S = 0.5


@pytest.fixture(autouse=True)
def run_identity() -> Iterator[None]:
    """Flower messages take their run id from the process's task identity (the ServerApp thread's)."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class SilentGrid(Grid):
    """Three nodes that accept every message and never reply."""

    def __init__(self) -> None:
        self.pushed: list[FlowerMessage] = []

    @property
    def run(self) -> Run:
        raise NotImplementedError("the driver never asks for the run")

    def set_run(self, run: Run) -> None:
        pass

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> FlowerMessage:
        return FlowerMessage(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [11, 12, 13]

    def push_messages(self, messages: Iterable[FlowerMessage]) -> Iterable[str]:
        batch = list(messages)
        self.pushed.extend(batch)
        return [f"m{len(self.pushed)}-{i}" for i in range(len(batch))]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[FlowerMessage]:
        return []

    def send_and_receive(self, messages: Iterable[FlowerMessage], *,
                         timeout: float | None = None) -> Iterable[FlowerMessage]:
        raise AssertionError("the driver must not block in Grid.send_and_receive: it cannot be interrupted")


def _stop_later(event: threading.Event) -> threading.Timer:
    timer = threading.Timer(STOP_AFTER_S, event.set)
    timer.start()
    return timer


def test_waiting_for_clients_ends_when_the_runtime_stops() -> None:
    stopped = threading.Event()
    driver = FlowerDriver(SilentGrid(), hello_timeout_s=0.2, runtime_stopped=stopped)
    _stop_later(stopped)
    start = time.monotonic()
    with pytest.raises(SimulationDriverError, match="runtime has stopped"):
        driver.wait_for_clients(3, timeout_s=600)
    assert time.monotonic() - start < 60  # far from the 600 s deadline, with room for a loaded machine


def test_an_exchange_ends_when_the_runtime_stops_not_at_its_deadline() -> None:
    stopped = threading.Event()
    grid = SilentGrid()
    driver = FlowerDriver(grid, runtime_stopped=stopped)
    driver.node_of = {client_id_for(0): 11}
    driver.client_of = {11: client_id_for(0)}
    message = Message(round=1, stage=Stage.TRAIN)
    # while the runtime lives, a silent client is a deadline miss, not an error
    missed = driver.exchange(1, {client_id_for(0): message}, timeout_s=0.3)
    assert missed.failures == {client_id_for(0): "no reply before the round deadline"}
    _stop_later(stopped)
    start = time.monotonic()
    with pytest.raises(SimulationDriverError, match="runtime has stopped"):
        driver.exchange(2, {client_id_for(0): message}, timeout_s=600)
    assert time.monotonic() - start < 60  # far from the 600 s deadline, with room for a loaded machine
    assert len(grid.pushed) == 2
