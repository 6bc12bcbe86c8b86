"""The pipelined Ray backend: an actor is sent its next message while it runs one, and an idle actor is preferred.

Real Ray actors under Flower's simulation engine (its worker threads, link state and Grid); the ClientApp
blocks on files the test creates, so what is in flight when is decided by the test, not by timing: a
message that could only have been sent to a busy actor by the pipelined backend is seen in flight while
that actor is held.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from simulations import flower_backend
from simulations.flower_backend import PIPELINE_DEPTH, PipelinedRayBackend, install_pipelined_backend, vce_api
from simulations.runner import SimulationOptions, backend_config, start_ray

WAIT_S = 300.0  # generous: a loaded CI machine starts Ray actors slowly


def _wait_for(condition: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


blocking_app = ClientApp()


@blocking_app.train()
def _train(message: FlowerMessage, context: Context) -> FlowerMessage:
    """Note that this message started (a file), hold until the test's release file exists, answer with the pid."""
    record = message.content.config_records["test"]
    Path(str(record["started"])).write_text(str(os.getpid()))
    release = str(record["release"])
    if release:
        _wait_for(lambda: Path(release).exists(), release)
    return FlowerMessage(RecordDict({"test": ConfigRecord({"name": record["name"], "pid": os.getpid()})}),
                         reply_to=message)


@pytest.fixture
def in_flight_peaks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records, each time the backend sends a message, how many each actor then holds; ``pipelined`` is set once
    some actor holds two (the real method runs; this only watches)."""
    seen: dict[str, Any] = {"peak": 0, "pipelined": threading.Event(), "backend": None}
    take = PipelinedRayBackend._take_actor

    def watched(self: PipelinedRayBackend) -> Any:
        actor = take(self)
        seen["backend"] = self
        seen["peak"] = max(seen["peak"], *self._in_flight.values())
        if seen["peak"] >= 2:
            seen["pipelined"].set()
        return actor

    monkeypatch.setattr(PipelinedRayBackend, "_take_actor", watched)
    return seen


def test_an_actor_gets_its_next_message_while_busy_and_an_idle_actor_goes_first(
        tmp_path: Path, in_flight_peaks: dict[str, Any]) -> None:
    assert install_pipelined_backend()
    files = {name: (tmp_path / f"{name}.started", tmp_path / f"{name}.release") for name in "abc"}
    seen: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _wait_for(lambda: len(list(grid.get_node_ids())) == 3, "the three nodes")
            nodes = sorted(grid.get_node_ids())

            def push(name: str, node: int, hold: bool) -> str:
                started, release = files[name]
                content = RecordDict({"test": ConfigRecord({"name": name, "started": str(started),
                                                            "release": str(release) if hold else ""})})
                (message_id,) = grid.push_messages([FlowerMessage(content, node, "train", ttl=2 * WAIT_S)])
                return message_id

            ids = {"a": push("a", nodes[0], hold=True)}
            _wait_for(files["a"][0].exists, "a to start")
            ids["b"] = push("b", nodes[1], hold=True)
            # b went to the other (idle) actor: it starts while a still holds the first
            _wait_for(files["b"][0].exists, "b to start on the idle actor while a is held")
            ids["c"] = push("c", nodes[2], hold=False)
            # both actors are held, yet c is sent to one of them: it waits in that actor's queue
            seen["c_sent_while_both_held"] = in_flight_peaks["pipelined"].wait(WAIT_S)
            seen["c_started_early"] = files["c"][0].exists()  # an actor runs one message at a time
            for name in "ab":
                files[name][1].write_text("go")
            replies: dict[str, Any] = {}

            def all_replied() -> bool:
                replies.update({r.metadata.reply_to_message_id: r for r in grid.pull_messages(list(ids.values()))})
                return len(replies) == len(ids)

            _wait_for(all_replied, "the three replies")
            seen["replies"] = {name: replies[mid] for name, mid in ids.items()}
        except BaseException as exc:
            seen["error"] = exc

    backend = backend_config(SimulationOptions(object_store_mb=100, cpus_per_client=1.0))
    backend["init_args"]["num_cpus"] = 2  # two actors, whatever the machine
    start_ray(backend["init_args"])
    run_simulation(server_app=app, client_app=blocking_app, num_supernodes=3, backend_name="ray",
                   backend_config=backend)
    assert "error" not in seen, seen.get("error")
    assert seen["c_sent_while_both_held"] and in_flight_peaks["peak"] == 2
    assert not seen["c_started_early"]
    replies = seen["replies"]
    assert all(not reply.has_error() for reply in replies.values()), [r.error for r in replies.values()]
    answers = {name: reply.content.config_records["test"] for name, reply in replies.items()}
    assert {name: answer["name"] for name, answer in answers.items()} == {"a": "a", "b": "b", "c": "c"}
    assert answers["a"]["pid"] != answers["b"]["pid"]  # two actors, each ran one of the held messages
    assert answers["c"]["pid"] in (answers["a"]["pid"], answers["b"]["pid"])
    backend_seen = in_flight_peaks["backend"]
    assert backend_seen.num_workers == 2 * PIPELINE_DEPTH and set(backend_seen._in_flight.values()) == {0}


def test_install_leaves_a_flower_whose_backend_is_not_the_expected_one_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class OtherBackend:
        def process_message(self, message: Any) -> None: ...

    monkeypatch.setattr(flower_backend.raybackend, "RayBackend", OtherBackend)
    assert not install_pipelined_backend()
    assert flower_backend.raybackend.RayBackend is OtherBackend


def test_the_engine_runs_every_worker_loop_however_many_actors() -> None:
    """Flower starts one never-ending loop per worker in ``vce_api.ThreadPoolExecutor()``; a default executor
    (min(32, CPUs + 4) threads) never starts the loops past its cap. 2 x 40 loops must all run at once."""
    assert install_pipelined_backend()
    loops = 2 * 40
    barrier = threading.Barrier(loops + 1)
    with vce_api.ThreadPoolExecutor() as executor:
        futures = [executor.submit(barrier.wait, WAIT_S) for _ in range(loops)]
        barrier.wait(WAIT_S)  # breaks (BrokenBarrierError) unless all the loops are running together
    assert all(future.exception() is None for future in futures)
