"""A Ray cluster of two nodes on this machine, for real: ``ray start --head`` and ``ray start --address``
(two raylets, one CPU each), then ``fedsite-simulate JOB.toml --ray-address HEAD:PORT`` as a user runs
it. Ray's own state API (the dashboard's, as ``ray list actors`` / ``ray list tasks`` use it) must show
the ClientApp actors and their tasks on both nodes, and the job must finish with every round ok.

This is what the README's "On a Ray cluster" section prescribes, with both nodes on one host: the
repository, data and output directory are at the same paths on every node because they are one node's.
The cluster lives in a temporary folder of its own (``--temp-dir``), on free ports, and is torn down by
the process ids found under that folder; ``ray stop`` would also stop every other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulations.harness.local_cluster import free_port
from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job

RAY = Path(sys.executable).parent / "ray"
SIMULATE = Path(sys.executable).parent / "fedsite-simulate"
START_TIMEOUT_S = 300.0  # a raylet registers in seconds when idle; a loaded 2-core machine is far slower

state_api = pytest.importorskip("ray.util.state", reason="Ray's state API")


def _dashboard_available() -> bool:
    """The state API is served by the dashboard, which needs the ray[default] extra (aiohttp_cors, ...)."""
    try:
        import aiohttp_cors  # noqa: F401
        import opencensus  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _dashboard_available(),
                       reason="Ray's dashboard (state API) needs ray[default]: pip install -e '.[dev]'"),
]


@dataclass
class TwoNodeCluster:
    gcs_address: str  # what --ray-address takes
    dashboard_url: str  # what the state API talks to
    temp_dir: Path


def _processes_under(folder: Path) -> list[int]:
    """Ids of this machine's processes whose command line names ``folder`` (the cluster's own), and their
    children (Ray's agents are started by the raylet with short command lines)."""
    marker = str(folder)
    found: set[int] = set()
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in cmdline:
            found.add(pid)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return sorted(found)


def _stop_cluster(folder: Path, grace_s: float = 20.0) -> None:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s`` (as ``ray stop`` does, but
    only for this cluster)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_under(folder)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _processes_under(folder) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _processes_under(folder):
            return


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> None:
    try:
        done = subprocess.run([str(RAY), "start", *args], env=env, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ray start {' '.join(args)} did not return in {START_TIMEOUT_S + 60:.0f}s") from exc
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}"


def _wait_for_nodes(dashboard_url: str, count: int) -> int:
    """Poll the state API until ``count`` nodes are alive (the dashboard starts after `ray start` returns)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        error: Exception | None = None
        try:
            alive = [n for n in state_api.list_nodes(address=dashboard_url, timeout=30) if n.state == "ALIVE"]
        except Exception as exc:  # not serving yet
            alive, error = [], exc
        if len(alive) >= count:
            return len(alive)
        assert time.monotonic() < deadline, f"{len(alive)}/{count} Ray nodes alive after {START_TIMEOUT_S}s: {error}"
        time.sleep(1)


@pytest.fixture
def two_node_cluster() -> Iterator[TwoNodeCluster]:
    # a short folder: Ray puts its Unix sockets under it (a socket path may not exceed 107 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    # Ray gives its dashboard 60 s to come up; on a 2-core machine shared with other work that failed once
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               RAY_DASHBOARD_STARTUP_TIMEOUT_S=str(int(START_TIMEOUT_S)))
    gcs_port, dashboard_port = free_port(), free_port()
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 1024 * 1024),
              "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        _ray_start(["--head", "--port", str(gcs_port), "--temp-dir", str(temp_dir), "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                    "--ray-client-server-port", str(free_port()),
                    "--dashboard-agent-listen-port", str(free_port()), *common], env, temp_dir / "head.log")
        # the second raylet: on another host this is the only command; here its agent needs its own port
        _ray_start(["--address", f"127.0.0.1:{gcs_port}", "--dashboard-agent-listen-port", str(free_port()),
                    *common], env, temp_dir / "worker.log")
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_nodes(dashboard_url, 2)
        yield TwoNodeCluster(gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=dashboard_url, temp_dir=temp_dir)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_clients_on_both_nodes_of_a_two_node_ray_cluster(
        two_node_cluster: TwoNodeCluster, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "tiny-bert")
    job = tiny_job(tmp_path, model, clients=8, per_round=4, rounds=2, max_train_examples=800, name="two-node")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run([str(SIMULATE), str(job), "--ray-address", two_node_cluster.gcs_address,
                           "--output-dir", str(out), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["status"] == "ok" and r["completed_clients"] == 4 for r in records[1:]), records
    assert (out / "final" / "config.json").exists()

    # Ray's own record of where the work ran: the two nodes, the ClientApp actors, their tasks
    url = two_node_cluster.dashboard_url
    nodes = {n.node_id for n in state_api.list_nodes(address=url, timeout=60) if n.state == "ALIVE"}
    assert len(nodes) == 2
    actors = [a for a in state_api.list_actors(address=url, detail=True, timeout=60)
              if a.class_name == "ClientAppActor"]
    assert {a.node_id for a in actors} == nodes, [(a.actor_id, a.node_id, a.state) for a in actors]
    runs = Counter(t.node_id for t in state_api.list_tasks(address=url, detail=True, timeout=60, limit=10_000)
                   if t.name == "ClientAppActor.run" and t.state == "FINISHED")
    assert set(runs) == nodes and all(count > 0 for count in runs.values()), runs
    # every message the simulation sent was run by an actor: a hello per client and a train per sampled client
    assert sum(runs.values()) >= 2 * 4, runs
    print(f"\ntwo-node Ray: ClientAppActor.run tasks per node {dict(runs)}; "
          f"actors {Counter(a.node_id[:12] for a in actors)}")
