"""Run one job file on Flower's simulation engine and write its output directory.

The same :func:`coordinator.job.prepare_job` as the gRPC coordinator builds the
package, the global model and the round engine; the training file of the
``[simulation]`` table is split among ``clients`` virtual clients with
:mod:`localio.partition`; Flower's simulation engine (Ray backend) runs a
ServerApp that drives the engine and a ClientApp per virtual client. At the
end the output directory holds ``metrics.jsonl``, checkpoints, ``final/``,
``report.md`` and the PNG plots, like a coordinator run plus the report.

Entry point: ``flwr.simulation.run_simulation`` (in-process). Flower 1.41 marks
it deprecated in favour of ``flwr run`` against a local SuperLink, but that
path needs a packaged Flower App (FAB), spawns a detached ``flower-superlink``
daemon on fixed ports and runs the apps in separate processes, which cannot
share the prepared job with the caller; ``run_simulation`` runs the very same
simulation engine (VCE + Ray actor pool) in this process, offline.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.simulation import run_simulation

from coordinator.config import ConfigError, JobConfig, SimulationSection
from coordinator.dashboard import JobInfo
from coordinator.job import prepare_job
from emulator.cache_dir import fedsite_cache_dir
from localio.allocator import reuse_freed_memory_by_default
from localio.atomic import atomic_write_text
from localio.data import DataError, check_labels, read_examples
from localio.partition import partition_indices
from privacy.accounting import PrivacyBudgetExhausted, PrivacyLedger, PrivacyPlanError, plan_noise_multiplier
from simulations.flower_app import ClientSettings, make_client_app, make_server_app
from simulations.report import print_table, write_report

if TYPE_CHECKING:
    from simulations.flower_driver import FlowerDriver

log = logging.getLogger("fedsite.simulation")


@dataclass
class SimulationOptions:
    """How to run (not what): overrides and the Ray backend's resources."""

    clients: int | None = None  # override [simulation] clients
    rounds: int | None = None  # override [job] rounds
    cpus_per_client: float = 1.0  # Ray resources per virtual client (actors = cluster CPUs / this)
    threads_per_client: int = 0  # torch threads in each actor; 0 = max(1, int(cpus_per_client))
    ray_address: str = "local"  # "local" = a fresh in-process Ray; "auto" or "ray://host:10001" = a cluster
    object_store_mb: int = 256  # Ray object store (local Ray only)
    cache_clients: int = 8  # encoded client datasets kept per actor
    progress: bool = True  # tqdm bar over rounds
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    dashboard: Any = None  # a coordinator.dashboard.JobView to keep informed (fedsite-simulate --dashboard-port)
    extra_init_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationResult:
    output_dir: Path
    records: list[dict[str, Any]]
    seconds: float
    config: JobConfig


class SimulationError(RuntimeError):
    """The simulation itself failed (not the user's job file): the message says where."""


def apply_overrides(config: JobConfig, options: SimulationOptions) -> JobConfig:
    """A copy of ``config`` with the command line's overrides, validated."""
    config = copy.deepcopy(config)
    if config.simulation is None:
        config.simulation = SimulationSection()
    sim = config.simulation
    if options.clients is not None:
        sim.clients = options.clients
    if options.rounds is not None:
        config.job.rounds = options.rounds
    if not sim.train_data:
        raise ConfigError("simulation.train_data is empty: the simulator needs a training file to split")
    if config.job.clients_per_round > sim.clients:
        log.warning("job.clients_per_round %d > %d clients: sampling all of them each round",
                    config.job.clients_per_round, sim.clients)
        config.job.clients_per_round = sim.clients
        config.job.min_clients = min(config.job.min_clients, sim.clients)
    config.validate()
    return config


def partition_table(config: JobConfig) -> list[list[int]]:
    """For each client, the row indices of the training file it owns (seeded, every row in one client)."""
    sim = config.simulation
    assert sim is not None
    classification = config.model.task == "classification"
    path = config.resolve(sim.train_data)
    rows = read_examples(path, need_label=classification)
    chosen = list(range(len(rows)))
    if 0 < sim.max_train_examples < len(rows):  # the same seeded draw as localio.data.sample
        chosen = sorted(random.Random(config.job.seed).sample(chosen, sim.max_train_examples))
    if sim.partition != "iid" and any(rows[i].label is None for i in chosen):
        # causal-lm rows may still carry a label (the WordNet glosses' supersense): it shapes a non-IID split
        raise ConfigError(f"simulation.partition = {sim.partition!r} needs a 'label' in every row of "
                          f"{path.name}; use 'iid' for unlabelled text")
    labels = [rows[i].label for i in chosen]
    parts = partition_indices(labels, sim.clients, partition=sim.partition, alpha=sim.alpha,
                              seed=config.job.seed, shards_per_client=sim.shards_per_client)
    return [[chosen[j] for j in part] for part in parts]


def check_dp_plan(config: JobConfig, sizes: list[int], output_dir: Path) -> None:
    """Refuse, before any training, a DP-SGD plan that some virtual client's data cannot carry.

    The simulator knows every client's data up front, so the check each client makes when its first
    round arrives (client/runtime.py) runs here for all of them, with their ledgers when resuming.
    """
    local_dp = config.privacy.local_dp
    if not local_dp.enabled or local_dp.target_epsilon is None:
        return
    steps = config.job.rounds * config.train.local_steps
    for index, size in enumerate(sizes):
        ledger_path = output_dir / "clients" / str(index) / "privacy-ledger.json"
        ledger = PrivacyLedger(ledger_path if ledger_path.exists() else None, accountant=local_dp.accountant)
        try:
            plan_noise_multiplier(examples=size, batch_size=config.train.batch_size, steps=steps,
                                  delta=local_dp.delta, ledger=ledger, target_epsilon=local_dp.target_epsilon)
        except PrivacyBudgetExhausted:
            continue  # a resumed client that spent its budget declines its rounds; the others go on
        except PrivacyPlanError as exc:
            raise ConfigError(f"privacy.local_dp.target_epsilon: virtual client {index}: {exc}") from exc


def _check_train_labels(config: JobConfig, labels: list[str]) -> None:
    if config.model.task != "classification":
        return
    sim = config.simulation
    assert sim is not None
    path = config.resolve(sim.train_data)
    check_labels(read_examples(path, need_label=True), labels, str(path))


def backend_config(options: SimulationOptions) -> dict[str, Any]:
    init_args: dict[str, Any] = {"address": options.ray_address, "logging_level": "ERROR",
                                 "log_to_driver": False, "include_dashboard": False}
    if options.ray_address == "local":
        init_args["num_cpus"] = max(1, os.cpu_count() or 1)
        init_args["object_store_memory"] = options.object_store_mb * 1024 * 1024
    init_args.update(options.extra_init_args)
    return {"client_resources": {"num_cpus": options.cpus_per_client, "num_gpus": 0.0},
            "init_args": init_args}


def run_job(config: JobConfig, output_dir: Path, options: SimulationOptions | None = None) -> SimulationResult:
    """Run ``config`` in simulation into ``output_dir`` (which must not hold a run yet)."""
    options = options or SimulationOptions()
    config = apply_overrides(config, options)
    sim = config.simulation
    assert sim is not None
    start = time.monotonic()
    log.info("preparing job %r (%s mode, %d virtual clients) in %s", config.job.name, config.job.mode,
             sim.clients, output_dir)
    table = partition_table(config)
    check_dp_plan(config, [len(part) for part in table], output_dir)  # before the package is built
    view = options.dashboard
    prepared = prepare_job(config, output_dir, resume=options.resume, report=view.set_preparing if view else None)
    if view is not None:
        view.attach(prepared.engine, JobInfo.from_config(config))  # the settings after --clients/--rounds
    _check_train_labels(config, prepared.package.spec.labels)
    partitions_file = output_dir / "partitions.json"
    atomic_write_text(partitions_file, json.dumps(table))
    threads = options.threads_per_client or max(1, int(options.cpus_per_client))
    settings = ClientSettings(
        package_dir=str(prepared.package.folder.resolve()), train_data=str(config.resolve(sim.train_data)),
        partitions_file=str(partitions_file.resolve()), output_dir=str(output_dir.resolve()),
        threads=threads, cache_clients=options.cache_clients,
        prefix_cache_dir=str(fedsite_cache_dir() / "frozen-prefix"),
    )
    engine = prepared.engine
    outcome: dict[str, Any] = {}
    bar = _progress(config, options.progress, done=engine.completed_rounds)
    if bar is not None:
        engine.round_hooks.append(lambda round_id, record: _tick(bar, record))

    def run_engine(driver: FlowerDriver) -> None:
        try:
            outcome["records"] = engine.run(driver)
        except BaseException as exc:  # carried to the caller with its type (ConfigError, RoundFailed, ...)
            outcome["error"] = exc

    _run_flower(run_engine, make_client_app(settings), sim.clients, backend_config(options))
    if bar is not None:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]
    if "records" not in outcome:
        raise SimulationError("Flower's simulation ended before the ServerApp ran (see the log above)")
    prepared.model.export(output_dir / "final")
    records = prepared.engine.metrics.read()
    seconds = time.monotonic() - start
    write_report([output_dir], output_dir, names=[config.job.name], title=f"fedsite simulation: {config.job.name}")
    print_table(records, file=sys.stdout, title=f"{config.job.name}: {sim.clients} clients, "
                f"{config.job.clients_per_round} per round, {seconds:.0f}s")
    return SimulationResult(output_dir=output_dir, records=records, seconds=seconds, config=config)


def _run_flower(run_engine: Callable[[FlowerDriver], None], client_app: Any, num_clients: int,
                backend: dict[str, Any], *, stop_wait_s: float = 60.0) -> None:
    """Run ``run_engine`` as the ServerApp of one Flower simulation; return once both have ended.

    Flower runs the ServerApp in a thread it never joins. If its runtime ends first (a Ray failure, an
    interrupt), the engine would keep waiting for clients that are gone and hold the process open; the
    driver is told the runtime stopped, and this waits (bounded) for the engine to notice.
    """
    runtime_stopped, engine_started, engine_done = threading.Event(), threading.Event(), threading.Event()

    def engine(driver: FlowerDriver) -> None:
        engine_started.set()
        try:
            run_engine(driver)
        finally:
            engine_done.set()

    reuse_freed_memory_by_default()  # the driver decodes and sums a few-MB update per client (localio/allocator.py)
    server_app = make_server_app(engine, runtime_stopped=runtime_stopped)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not log.isEnabledFor(logging.DEBUG):
        # Flower 1.41 logs run_simulation's deprecation (see the module docstring) and a line per
        # message; a client's failure still reaches metrics.jsonl as a drop reason
        flwr_log.setLevel(logging.ERROR)
    try:
        start_ray(backend.get("init_args", {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                           backend_name="ray", backend_config=backend)
    finally:
        runtime_stopped.set()
        _stop_ray()
        flwr_log.setLevel(level)
        # an engine that had not started by now sees the stop at its first call to the driver
        if engine_started.is_set() and not engine_done.wait(stop_wait_s):
            log.error("the round engine did not stop within %.0fs of Flower's runtime", stop_wait_s)


RAY_START_ATTEMPTS = 3


def _stop_ray() -> None:
    """Flower shuts Ray down when a run ends normally; not when it fails on the way."""
    import ray  # noqa: PLC0415 - Ray (heavy) only where a run used it

    if ray.is_initialized():
        ray.shutdown()


def start_ray(init_args: dict[str, Any], attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start (or connect to) Ray before Flower does, retrying a node that was slow to come up.

    Ray gives its GCS and raylet fixed times to come up (30 s for the raylet to register); on a loaded
    2-core machine that can fail once and then work. Flower's backend keeps a Ray that is already
    initialised (and shuts it down at the end), so starting it here with the same arguments changes
    nothing else.
    """
    import ray  # noqa: PLC0415 - Ray (heavy) only where a run uses it

    if ray.is_initialized():
        return
    # what Flower's RayBackend.init_ray does: actors import the project from the driver's sys.path
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    args = {"include_dashboard": False, **init_args}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
            return
        except Exception as exc:  # Ray raises bare Exception for a node that timed out
            ray.shutdown()
            # a raylet that did not register or a GCS that did not write its port file in time
            if "timed out" not in str(exc).lower() or attempt == attempts:
                raise SimulationError(f"Ray did not start ({attempt} attempt(s)): {exc}") from exc
            log.warning("Ray's node did not come up in time (attempt %d of %d); retrying", attempt, attempts)


def _progress(config: JobConfig, enabled: bool, done: int = 0) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415 - a progress bar only when asked for
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=config.job.rounds, initial=done, desc=config.job.name, unit="round", file=sys.stderr,
                leave=True)


def _tick(bar: Any, record: dict[str, Any]) -> None:
    shown: dict[str, str] = {}
    for key in ("val_accuracy", "val_perplexity", "epsilon_local_max", "epsilon_client"):
        if isinstance(record.get(key), float):
            shown[key] = f"{record[key]:.3f}"
    shown["ok"] = f"{record.get('completed_clients', 0)}/{record.get('sampled_clients', 0)}"
    bar.set_postfix(shown, refresh=False)
    bar.update(1)


__all__ = ["DataError", "SimulationError", "SimulationOptions", "SimulationResult", "apply_overrides",
           "backend_config", "check_dp_plan", "partition_table", "run_job"]
