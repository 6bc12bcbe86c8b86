"""Benchmark: does the simulation scale in the number of enrolled clients, and what does Flower cost?

Part 1. The same job (a tiny random BERT with the MiniLM tokenizer, 50
clients sampled per round) with 100, 300 and 1,000 enrolled virtual clients:
seconds per round and peak resident memory (this process plus its Ray
workers), reported as ratios to the 100-client run. Flat = memory does not
grow with the clients enrolled, only with those sampled.

Part 2. Overhead per client per round: one simulated round of K clients
against K calls of the same ClientRuntime.handle in a plain loop in one
process (same model, same data, same messages), measured side by side.

    HF_HUB_OFFLINE=1 python -m simulations.bench_scale [--clients 100 300 1000] [--per-round 50] \
        [--rounds 3] [--out bench_scale.json]
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "coordinator" / "examples" / "data"
TRAIN = DATA / "wordnet_supersense.train.jsonl.gz"
VALIDATION = DATA / "wordnet_supersense.validation.jsonl.gz"
EXAMPLES_PER_CLIENT = 90  # 1,000 clients x 90 fits in the 94,448 training rows


def make_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0, dropout: float = 0.0) -> Path:
    """A tiny random BERT (hidden 32) with the MiniLM tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from emulator.models import embedded_model_path

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_job(folder: Path, model_dir: Path, *, clients: int, per_round: int, rounds: int,
             local_steps: int = 2, max_train_examples: int = 0, name: str = "tiny") -> Path:
    """A job file for the tiny model on WordNet (IID split), written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f"""
[job]
name = "{name}"
rounds = {rounds}
clients_per_round = {per_round}
min_clients = {max(1, per_round // 2)}
round_timeout_s = 600
seed = 0

[model]
path = "{model_dir}"
max_length = 24

[data]
validation = "{VALIDATION}"
validation_max_examples = 200

[train]
local_steps = {local_steps}
batch_size = 8
lr = 1e-3

[lora]
r = 4
alpha = 8

[simulation]
clients = {clients}
partition = "iid"
train_data = "{TRAIN}"
max_train_examples = {max_train_examples}
""")
    return path


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


def scale_run(work: Path, model_dir: Path, clients: int, per_round: int, rounds: int,
              num_cpus: int = 0) -> dict[str, Any]:
    """One simulation in a fresh subprocess (its own Ray; ``num_cpus`` 0 = all), measured from outside."""
    tag = f"{clients}" + (f"-cpu{num_cpus}" if num_cpus else "")
    out = work / f"run-{tag}"
    # the same data per client at every scale (~90 examples), so only the number enrolled changes
    job = tiny_job(work, model_dir, clients=clients, per_round=per_round, rounds=rounds,
                   max_train_examples=EXAMPLES_PER_CLIENT * clients, name=f"scale{tag}")
    cmd = [sys.executable, "-m", "simulations.bench_scale", "--child", str(job), str(out), str(num_cpus)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    with PeakSampler() as sampler:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"simulation with {clients} clients failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds_done = [r for r in records if r["round"] > 0]
    # round 1 pays for actors loading the model; the steady state is what scales
    steady = rounds_done[1:] or rounds_done
    phase = [r["seconds"] - r.get("seconds_eval", 0.0) - r.get("seconds_aggregate", 0.0) for r in steady]
    return {"clients": clients, "per_round": per_round, "num_cpus": num_cpus, "wall_s": time.monotonic() - start,
            "first_round_s": rounds_done[0]["seconds"], "round_s": sum(r["seconds"] for r in steady) / len(steady),
            "client_phase_s": sum(phase) / len(phase),
            "peak_rss_mb": sampler.peak, "completed": [r["completed_clients"] for r in rounds_done]}


def _child(job: Path, out: Path, num_cpus: int) -> int:
    """Runs inside the subprocess of scale_run."""
    import logging

    from coordinator.config import load_job
    from simulations.runner import SimulationOptions, run_job

    logging.basicConfig(level=logging.WARNING)
    extra = {"num_cpus": num_cpus} if num_cpus else {}
    run_job(load_job(job), out, SimulationOptions(progress=False, extra_init_args=extra))
    return 0


def direct_overhead(work: Path, model_dir: Path, per_round: int, clients: int) -> dict[str, Any]:
    """Seconds per client of ClientRuntime.handle in a plain loop (same messages as the simulation)."""
    import torch

    from coordinator.config import load_job
    from coordinator.job import prepare_job
    from simulations.flower_app import ClientSettings, client_runtime
    from simulations.runner import SimulationOptions, apply_overrides, partition_table

    torch.set_num_threads(1)
    job = tiny_job(work, model_dir, clients=clients, per_round=per_round, rounds=1,
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
    sampled = prepared.engine.sample(1, [f"{i}" for i in range(clients)])
    message = prepared.engine.train_message(1, len(sampled))
    client_runtime(settings, 0).handle(message)  # warm-up: model loaded, like an actor after round 1
    start = time.monotonic()
    for cid in sampled:
        client_runtime(settings, int(cid)).handle(message)
    seconds = time.monotonic() - start
    return {"clients": len(sampled), "seconds": seconds, "per_client_s": seconds / len(sampled)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(Path(argv[1]), Path(argv[2]), int(argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedsite-bench-scale-"))
    model_dir = make_tiny_bert(work / "tiny-bert")
    runs = [scale_run(work, model_dir, n, args.per_round, args.rounds) for n in args.clients]
    base = runs[0]
    for run in runs:
        run["round_ratio"] = run["round_s"] / base["round_s"]
        run["memory_ratio"] = run["peak_rss_mb"] / base["peak_rss_mb"]
    # overhead: one actor on one CPU against the same clients handled in a plain loop on one thread
    single = scale_run(work, model_dir, args.clients[0], args.per_round, args.rounds, num_cpus=1)
    direct = direct_overhead(work, model_dir, args.per_round, args.clients[0])
    sim_per_client = single["client_phase_s"] / args.per_round
    overhead = {"direct_per_client_s": direct["per_client_s"], "simulated_per_client_s": sim_per_client,
                "overhead_per_client_s": sim_per_client - direct["per_client_s"],
                "ratio": sim_per_client / direct["per_client_s"], "single_actor_run": single}
    print(f"{'clients':>8} {'round s':>8} {'ratio':>6} {'peak MB':>8} {'ratio':>6} {'1st round s':>11}")
    for run in runs:
        print(f"{run['clients']:>8} {run['round_s']:>8.2f} {run['round_ratio']:>6.2f} {run['peak_rss_mb']:>8.0f} "
              f"{run['memory_ratio']:>6.2f} {run['first_round_s']:>11.2f}")
    print(f"per client per round, one CPU: direct loop {direct['per_client_s'] * 1000:.1f} ms, simulated "
          f"{sim_per_client * 1000:.1f} ms (x{overhead['ratio']:.2f}, +{overhead['overhead_per_client_s'] * 1000:.1f} "
          "ms per client; client phase only, evaluation and aggregation excluded)")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "direct": direct, "overhead": overhead}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
