"""Benchmark: does the simulation scale in the number of enrolled clients, and what does Flower cost?

Part 1. The same job (a tiny random BERT with the MiniLM tokenizer, 100
clients sampled per round) with 1,000 and 10,000 enrolled virtual clients:
seconds per round (steady state, rounds 2..R), the first round's seconds
(actors load the model; before the fedsite dispatch, also a discovery hello
to every enrolled node) and peak resident memory (this process plus its Ray
workers), as ratios to the first (smallest) run. Flat = time and memory grow
with the clients sampled, not with those enrolled. Every client holds the same
number of examples at every scale (the training rows divided by the largest
scale), so only the number enrolled changes. ``--compare-flower-loop`` adds,
side by side and interleaved, the same runs with Flower's own message loop
(it polls every node ten times a second) and hello discovery: the "before".

Part 2 (``--overhead``). Overhead per client per round: a simulated round of
K = 50 clients on one Ray actor (one CPU) against K calls of the same
ClientRuntime.handle in a plain loop in one process (same model, same data,
same messages); each pair in fresh subprocesses, ``--overhead-repeat`` pairs
interleaved, the ratio simulated ÷ direct per pair (median, min, max).

What each arm times. Direct: what a client does, per client: its
ClientRuntime over its partition (examples encoded, as an actor does for a
client not in its cache) and ``handle`` of the round's train message, nothing
carried anywhere; for the clients the simulation samples in its steady rounds
(2..R), round by round (it used to be one round's 50, which left a pair's
ratio at the mercy of half a second's noise). Simulated: the engine's exchange of a steady round
(``seconds_exchange`` of metrics.jsonl, rounds 2..R), i.e. what the simulation
does to get the message to the K clients and their updates back: packing the
message into Flower records, the Grid and link state, Flower's engine and Ray
taking it to the actor, the ClientApp (unpack, the same ClientRuntime and
``handle``, Context, pack), the way back, and the driver decoding every reply
(plus reading each reply's report). Not in it: the engine's work before and
after the exchange that any driver does the same (building the train message,
checking each update's norm, ordering and averaging them; gRPC would pay it
too), nor evaluation, aggregation and checkpoints. The JSON also keeps the
older figure, the whole client phase (round seconds minus evaluation and
aggregation, so with that engine work) per client and its ratio,
``client_phase_ratio_*``. ``--baseline-tree DIR`` runs
the same pairs from another checkout too (e.g. ``git worktree add DIR REV``),
interleaved with this one's, for a before/after in one run. ``--only-overhead``
skips part 1.

    HF_HUB_OFFLINE=1 python -m simulations.bench.scale [--clients 1000 10000] [--per-round 100] \
        [--rounds 4] [--repeat 2] [--compare-flower-loop] [--overhead] [--only-overhead] \
        [--overhead-repeat 3] [--baseline-tree DIR] [--out bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job

REPO = Path(__file__).resolve().parents[2]
TRAIN_ROWS = 94_448  # rows of the WordNet training split; every client gets TRAIN_ROWS // largest scale
EXAMPLES_PER_CLIENT = 90  # part 2 (overhead), at its 100 clients


# -- memory of a process tree (this process + Ray's) ----------------------------------------------

def _tree_rss_mb() -> float:
    """Resident memory of this process and all its descendants (Ray raylet, GCS, workers)."""
    try:
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for line in out.splitlines():
        pid, ppid, kb = (int(x) for x in line.split())
        children.setdefault(ppid, []).append(pid)
        rss[pid] = kb
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


class PeakSampler:
    """Samples the process tree's RSS every ``interval`` seconds; keeps the peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_mb())


def bench_module(tree: Path, name: str) -> str:
    """Benchmark ``name``'s module in checkout ``tree``: ``simulations.bench.<name>``, or in a checkout from before
    the benchmarks moved into simulations/bench/, ``simulations.bench_<name>`` (so an earlier tree still serves
    as a baseline)."""
    moved = (tree / "simulations" / "bench" / f"{name}.py").exists()
    return f"simulations.bench.{name}" if moved else f"simulations.bench_{name}"


def child_env(tree: Path) -> dict[str, str]:
    """Environment of a measured subprocess: one thread, offline, and ``tree``'s code first on the path."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))


def scale_run(work: Path, model_dir: Path, clients: int, per_round: int, rounds: int,
              num_cpus: int = 0, *, per_client: int = EXAMPLES_PER_CLIENT, loop: str = "fedsite",
              tag: str = "", tree: Path = REPO) -> dict[str, Any]:
    """One simulation in a fresh subprocess (its own Ray; ``num_cpus`` 0 = all), measured from outside.

    ``loop`` "fedsite" = the driver's NodeDispatch (the default of every simulation); "flower" = Flower's
    own message loop and hello discovery, as before the dispatch existed. ``tree``: the checkout whose
    code runs the simulation (this one by default).
    """
    tag = tag or f"{clients}-{loop}" + (f"-cpu{num_cpus}" if num_cpus else "")
    out = work / f"run-{tag}"
    job = tiny_job(work, model_dir, clients=clients, per_round=per_round, rounds=rounds,
                   max_train_examples=per_client * clients, name=f"scale{tag}")
    cmd = [sys.executable, "-m", bench_module(tree, "scale"), "--child", str(job), str(out), str(num_cpus), loop]
    start = time.monotonic()
    with PeakSampler() as sampler:
        proc = subprocess.run(cmd, env=child_env(tree), capture_output=True, text=True, cwd=str(tree))
    if proc.returncode != 0:
        raise RuntimeError(f"simulation with {clients} clients failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds_done = [r for r in records if r["round"] > 0]
    short = [r for r in rounds_done if r.get("status") != "ok" or r["completed_clients"] < per_round]
    if short:  # a round that lost clients (e.g. Ray's OOM killer on a crowded machine) times nothing useful
        reason = next(iter((short[0].get("drop_reasons") or {}).values()), short[0].get("failure", ""))
        raise RuntimeError(f"{clients} clients: round {short[0]['round']} completed {short[0]['completed_clients']}"
                           f"/{per_round} ({str(reason)[:300]})")
    # round 1 pays for actors loading the model (and, with Flower's loop, the hellos); the steady state scales
    steady = rounds_done[1:] or rounds_done
    phase = [r["seconds"] - r.get("seconds_eval", 0.0) - r.get("seconds_aggregate", 0.0) for r in steady]
    exchange = [r["seconds_exchange"] for r in steady]
    return {"clients": clients, "per_round": per_round, "num_cpus": num_cpus, "loop": loop,
            "examples_per_client": per_client, "wall_s": time.monotonic() - start,
            "first_round_s": rounds_done[0]["seconds"], "round_s": sum(r["seconds"] for r in steady) / len(steady),
            "client_phase_s": sum(phase) / len(phase), "exchange_s": sum(exchange) / len(exchange),
            "peak_rss_mb": sampler.peak, "completed": [r["completed_clients"] for r in rounds_done]}


def _child(job: Path, out: Path, num_cpus: int, loop: str = "fedsite") -> int:
    """Runs inside the subprocess of scale_run."""
    import logging

    from coordinator.config import load_job
    from simulations import flower_app
    from simulations.runner import SimulationOptions, run_job

    logging.basicConfig(level=logging.WARNING)
    if loop == "flower":  # the "before": no dispatch, so Flower's poll of every node and hello discovery
        flower_app.install_dispatch = lambda: False
    extra = {"num_cpus": num_cpus} if num_cpus else {}
    run_job(load_job(job), out, SimulationOptions(progress=False, extra_init_args=extra))
    return 0


def direct_overhead(work: Path, model_dir: Path, per_round: int, clients: int, rounds: int = 2) -> dict[str, Any]:
    """Seconds per client of ClientRuntime.handle in a plain loop: the clients the simulation samples in its steady
    rounds (2..``rounds``), each with its round's train message, one after another."""
    import torch

    from coordinator.config import load_job
    from coordinator.job import prepare_job
    from simulations.flower_app import ClientSettings, client_runtime
    from simulations.flower_driver import client_id_for
    from simulations.runner import SimulationOptions, apply_overrides, partition_table

    torch.set_num_threads(1)
    job = tiny_job(work, model_dir, clients=clients, per_round=per_round, rounds=rounds,
                   max_train_examples=EXAMPLES_PER_CLIENT * clients, name="direct")
    config = apply_overrides(load_job(job), SimulationOptions())
    out = work / "direct"
    prepared = prepare_job(config, out)
    table = partition_table(config)
    (out / "partitions.json").write_text(json.dumps(table))
    sim = config.simulation
    assert sim is not None
    settings = ClientSettings(package_dir=str(prepared.package.folder), train_data=str(config.resolve(sim.train_data)),
                              partitions_file=str(out / "partitions.json"), output_dir=str(out), threads=1)
    partition_of = {client_id_for(p): p for p in range(clients)}  # the simulation's client ids, so its samples
    plan = []
    for round_id in range(2, max(rounds, 2) + 1):
        sampled = prepared.engine.sample(round_id, sorted(partition_of))
        plan.append((sampled, prepared.engine.train_message(round_id, len(sampled))))
    client_runtime(settings, 0).handle(plan[0][1])  # warm-up: model loaded, like an actor after round 1
    handled, start = 0, time.monotonic()
    for sampled, message in plan:
        for cid in sampled:
            client_runtime(settings, partition_of[cid]).handle(message)
        handled += len(sampled)
    seconds = time.monotonic() - start
    return {"clients": handled, "rounds": len(plan), "seconds": seconds, "per_client_s": seconds / handled}


def direct_run(work: Path, model_dir: Path, per_round: int, clients: int, tree: Path = REPO,
               rounds: int = 2) -> dict[str, Any]:
    """:func:`direct_overhead` in a fresh subprocess running ``tree``'s code (an older tree's takes no ``rounds``)."""
    code = (f"import inspect, json, sys; from pathlib import Path; from {bench_module(tree, 'scale')} import "
            "direct_overhead; kw = {'rounds': int(sys.argv[5])} if 'rounds' in "
            "inspect.signature(direct_overhead).parameters else {}; "
            "print('RESULT ' + json.dumps(direct_overhead(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "
            "int(sys.argv[4]), **kw)))")
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code, str(work), str(model_dir), str(per_round), str(clients),
                           str(rounds)], env=child_env(tree), capture_output=True, text=True, cwd=str(tree))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"direct loop failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def overhead_pairs(work: Path, model_dir: Path, *, per_round: int, rounds: int, repeat: int,
                   trees: dict[str, Path]) -> dict[str, Any]:
    """Simulated (one actor, one CPU) vs direct per client, ``repeat`` pairs per tree, all interleaved."""
    clients = 100
    pairs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in trees}
    for i in range(repeat):
        arms = list(trees) if i % 2 == 0 else list(reversed(trees))  # alternate which arm runs first
        for arm in arms:
            tree = trees[arm]
            sim = scale_run(work, model_dir, clients, per_round, rounds, num_cpus=1, tree=tree, tag=f"ovh-{arm}-r{i}")
            direct = direct_run(work / f"direct-{arm}-r{i}", model_dir, per_round, clients, tree=tree, rounds=rounds)
            sim_per_client = sim["exchange_s"] / per_round  # see the module docstring: what each arm times
            pair = {"simulated_per_client_s": sim_per_client, "direct_per_client_s": direct["per_client_s"],
                    "ratio": sim_per_client / direct["per_client_s"],
                    "client_phase_per_client_s": sim["client_phase_s"] / per_round,
                    "client_phase_ratio": sim["client_phase_s"] / per_round / direct["per_client_s"],
                    "single_actor_run": sim, "direct": direct}
            pairs[arm].append(pair)
            print(f"  {arm:>8} (pair {i + 1}): direct {direct['per_client_s'] * 1000:.1f} ms, simulated "
                  f"{sim_per_client * 1000:.1f} ms per client (x{pair['ratio']:.2f}; whole client phase "
                  f"x{pair['client_phase_ratio']:.2f})", flush=True)
    summary: dict[str, Any] = {}
    for arm, mine in pairs.items():
        ratios = [p["ratio"] for p in mine]
        phase_ratios = [p["client_phase_ratio"] for p in mine]
        summary[arm] = {"tree": str(trees[arm]), "pairs": mine, "ratio_median": median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "client_phase_ratio_median": median(phase_ratios),
                        "client_phase_ratio_min": min(phase_ratios), "client_phase_ratio_max": max(phase_ratios),
                        "direct_per_client_s": median([p["direct_per_client_s"] for p in mine]),
                        "simulated_per_client_s": median([p["simulated_per_client_s"] for p in mine])}
        summary[arm]["overhead_per_client_s"] = (summary[arm]["simulated_per_client_s"]
                                                 - summary[arm]["direct_per_client_s"])
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(Path(argv[1]), Path(argv[2]), int(argv[3]), *(argv[4:5] or ["fedsite"]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="runs per arm, interleaved; medians are reported")
    parser.add_argument("--compare-flower-loop", action="store_true",
                        help="also run every scale with Flower's own message loop and hello discovery (before)")
    parser.add_argument("--overhead", action="store_true", help="part 2: simulated vs direct per-client cost")
    parser.add_argument("--only-overhead", action="store_true", help="part 2 only (implies --overhead)")
    parser.add_argument("--overhead-repeat", type=int, default=3, help="simulated/direct pairs per checkout")
    parser.add_argument("--overhead-rounds", type=int, default=6, help="rounds per simulated run (first excluded)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="another checkout (e.g. a git worktree of an older revision) to run part 2 from too")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedsite-bench-scale-"))
    model_dir = make_tiny_bert(work / "tiny-bert")
    per_client = max(1, min(EXAMPLES_PER_CLIENT, TRAIN_ROWS // max(args.clients)))
    all_runs: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if not args.only_overhead:
        loops = ["flower", "fedsite"] if args.compare_flower_loop else ["fedsite"]
        for repeat in range(args.repeat):  # arms interleaved, so a change in the machine's load hits them all
            for loop in loops:
                for n in args.clients:
                    run = scale_run(work, model_dir, n, args.per_round, args.rounds, per_client=per_client, loop=loop,
                                    tag=f"{n}-{loop}-r{repeat}")
                    print(f"  {loop:>7} loop, {n:>6} enrolled (repeat {repeat + 1}): round {run['round_s']:.2f}s, "
                          f"first round {run['first_round_s']:.2f}s, peak {run['peak_rss_mb']:.0f} MB", flush=True)
                    all_runs.append(run)
        for loop in loops:
            for n in args.clients:
                mine = [r for r in all_runs if r["loop"] == loop and r["clients"] == n]
                runs.append({"loop": loop, "clients": n, "per_round": args.per_round, "repeats": len(mine),
                             "examples_per_client": per_client,
                             **{key: median([r[key] for r in mine]) for key in
                                ("round_s", "first_round_s", "client_phase_s", "peak_rss_mb", "wall_s")}})
        for run in runs:
            base = next(r for r in runs if r["loop"] == run["loop"] and r["clients"] == args.clients[0])
            for key, ratio in (("round_s", "round_ratio"), ("first_round_s", "first_round_ratio"),
                               ("peak_rss_mb", "memory_ratio")):
                run[ratio] = run[key] / base[key]
        print(f"{args.per_round} sampled per round, {per_client} examples per client, {args.rounds} rounds, "
              f"median of {args.repeat}; ratios to {args.clients[0]} enrolled with the same loop")
        print(f"{'loop':>7} {'enrolled':>8} {'round s':>8} {'ratio':>6} {'peak MB':>8} {'ratio':>6} "
              f"{'1st round s':>11} {'ratio':>6}")
        for run in runs:
            print(f"{run['loop']:>7} {run['clients']:>8} {run['round_s']:>8.2f} {run['round_ratio']:>6.2f} "
                  f"{run['peak_rss_mb']:>8.0f} {run['memory_ratio']:>6.2f} {run['first_round_s']:>11.2f} "
                  f"{run['first_round_ratio']:>6.2f}")
    result: dict[str, Any] = {"runs": runs, "all_runs": all_runs}
    if args.overhead or args.only_overhead:
        # one actor on one CPU against the same clients handled in a plain loop on one thread
        trees = {"this": REPO}
        if args.baseline_tree:
            trees = {"baseline": args.baseline_tree.resolve(), "this": REPO}
        per_round = min(50, args.per_round)
        summary = overhead_pairs(work, model_dir, per_round=per_round, rounds=args.overhead_rounds,
                                 repeat=args.overhead_repeat, trees=trees)
        print(f"per client per round, one CPU, {per_round} clients per round, median (min-max) of "
              f"{args.overhead_repeat} interleaved pairs; simulated = the engine's exchange (the whole client "
              f"phase, with the engine's own checks and averaging, in brackets)")
        for arm, figures in summary.items():
            print(f"  {arm:>8}: direct {figures['direct_per_client_s'] * 1000:.1f} ms, simulated "
                  f"{figures['simulated_per_client_s'] * 1000:.1f} ms, simulated / direct "
                  f"x{figures['ratio_median']:.2f} ({figures['ratio_min']:.2f}-{figures['ratio_max']:.2f}) "
                  f"[client phase x{figures['client_phase_ratio_median']:.2f} "
                  f"({figures['client_phase_ratio_min']:.2f}-{figures['client_phase_ratio_max']:.2f})]  "
                  f"[{figures['tree']}]")
        result.update(overhead=summary)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
