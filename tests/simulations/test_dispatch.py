"""The simulation's message dispatch at a scale where Flower's own loop shows: 300 enrolled virtual clients.

Flower's engine asks its link state for a message for every node ten times a second, and the driver's
discovery used to send a hello to every node; both grow with the clients enrolled. With the fedsite
dispatch (simulations.flower_driver.NodeDispatch) the partitions come from the engine's own node table
and the link state is asked only about nodes that were sent something. A simulation whose driver does
not register (any other ServerApp) must still get its messages through Flower's loop.

Real Ray actors, the real Grid and link state, the tiny BERT; nothing is stubbed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.checkpoint import Checkpointer
from coordinator.config import load_job
from protos.codec import Message
from protos.wire import Stage, TrainInstruction
from simulations.flower_app import ClientSettings, make_client_app
from simulations.flower_driver import FlowerDriver, client_id_for, install_dispatch
from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job
from simulations.runner import SimulationOptions, _run_flower, backend_config, run_job, start_ray

ENROLLED, PER_ROUND = 300, 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One whole simulated job with 300 enrolled clients (its package and partitions serve the tests)."""
    work = tmp_path_factory.mktemp("dispatch")
    model = make_tiny_bert(work / "tiny-bert")
    job = tiny_job(work, model, clients=ENROLLED, per_round=PER_ROUND, rounds=2, max_train_examples=20 * ENROLLED)
    out = work / "run"
    run_job(load_job(job), out, SimulationOptions(progress=False, object_store_mb=100))
    return out


def _settings(run: Path) -> ClientSettings:
    config = json.loads((run / "job.toml.json").read_text())
    return ClientSettings(package_dir=str(run / "package"), train_data=config["simulation"]["train_data"],
                          partitions_file=str(run / "partitions.json"), output_dir=str(run), threads=1)


def _train_message(run: Path) -> Message:
    state = Checkpointer(run / "checkpoints").latest().global_state  # type: ignore[union-attr]
    return Message(round=1, stage=Stage.TRAIN, tensors=state,
                   config=TrainInstruction(local_steps=1, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0).to_config())


def test_a_job_with_300_enrolled_clients_runs_every_round(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["status"] == "ok" and r["completed_clients"] == PER_ROUND for r in records[1:]), records


def test_dispatch_asks_only_about_nodes_it_sent_to_and_sends_no_hello(run_dir: Path) -> None:
    message = _train_message(run_dir)
    seen: dict[str, Any] = {}

    def scenario(driver: FlowerDriver) -> None:
        try:
            seen["clients"] = driver.wait_for_clients(ENROLLED, 300)
            assert driver.dispatch is not None
            sweeps_before, asks_before = driver.dispatch.sweeps, driver.dispatch.asks
            chosen = [client_id_for(p) for p in (0, 150, 299)]
            pull = driver.grid.pull_messages
            pulls: list[int] = []  # replies each pull brought

            def counted_pull(message_ids: Any) -> Any:
                answered = list(pull(message_ids))
                pulls.append(len(answered))
                return answered

            driver.grid.pull_messages = counted_pull  # type: ignore[method-assign]
            driver.STOP_CHECK_S = 600.0  # only the stored replies can wake the driver before the deadline
            began = time.monotonic()
            seen["exchange"] = driver.exchange(1, dict.fromkeys(chosen, message), 300)
            seen["exchange_s"] = time.monotonic() - began
            seen["pulls"] = pulls
            seen["sweeps"] = driver.dispatch.sweeps - sweeps_before
            seen["asks"] = driver.dispatch.asks - asks_before
            seen["hellos"] = driver.hellos_sent
            seen["table"] = len(driver.dispatch.partition_of)
        except BaseException as exc:
            seen["error"] = exc

    _run_flower(scenario, make_client_app(_settings(run_dir)), ENROLLED,
                backend_config(SimulationOptions(object_store_mb=100)))
    assert "error" not in seen, seen.get("error")
    assert seen["clients"] == sorted(client_id_for(p) for p in range(ENROLLED))
    assert seen["hellos"] == 0 and seen["table"] == ENROLLED
    exchange = seen["exchange"]
    assert sorted(exchange.replies) == [client_id_for(0), client_id_for(150), client_id_for(299)], exchange.failures
    # the link state is asked once per message sent: about the three nodes, once each (a node handed the message
    # it was expected to get is not asked again), never about all 300
    assert seen["sweeps"] >= 1 and seen["asks"] == 3, seen
    # the last stored reply wakes the driver (no clock: its stop check was set past the deadline): it pulled in
    # vain once right after pushing, then once for all three replies; neither once per reply nor, as Flower's
    # Grid does, ten times a second for as long as the clients work
    assert seen["exchange_s"] < 300 and seen["pulls"] in ([0, 3], [3]), seen


def test_a_driver_without_the_dispatch_still_gets_its_messages_through_flowers_loop(run_dir: Path) -> None:
    """The patched engine keeps Flower's poll of every node for a run whose driver did not register."""
    assert install_dispatch()
    message = _train_message(run_dir)
    seen: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            driver = FlowerDriver(grid, hello_timeout_s=300)  # no dispatch: hellos, Flower's loop
            seen["clients"] = driver.wait_for_clients(ENROLLED, 300)
            seen["hellos"] = driver.hellos_sent
            seen["exchange"] = driver.exchange(1, {client_id_for(7): message}, 300)
        except BaseException as exc:
            seen["error"] = exc

    from flwr.simulation import run_simulation

    backend = backend_config(SimulationOptions(object_store_mb=100))
    start_ray(backend["init_args"])
    run_simulation(server_app=app, client_app=make_client_app(_settings(run_dir)), num_supernodes=ENROLLED,
                   backend_name="ray", backend_config=backend)
    assert "error" not in seen, seen.get("error")
    assert seen["clients"] == sorted(client_id_for(p) for p in range(ENROLLED)) and seen["hellos"] == ENROLLED
    assert list(seen["exchange"].replies) == [client_id_for(7)], seen["exchange"].failures
