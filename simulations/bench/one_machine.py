"""Benchmark (not a test): a training step of one client alone vs three clients and the coordinator on one machine.

The README's one-machine recipe, as real processes (``python -m coordinator serve``, ``python -m client run``)
over loopback, on the shipped example job (coordinator/examples/wordnet-lora.toml: MiniLM, DP-SGD, the frozen
encoder run once per client) with smaller shards, fewer steps and rounds. Arms, each a whole job:

- ``alone``: the coordinator and one client, the CLIs' defaults;
- ``3 default``: the coordinator and three clients, the CLIs' defaults (torch's default threads in every
  process; since issue 16 the CLIs set ``OMP_WAIT_POLICY=PASSIVE`` when the user has not chosen);
- ``3 threads=1``: the same with ``--threads 1`` on each client (the README's recipe before issue 16);
- ``alone spin`` / ``3 spin``: as ``alone`` / ``3 default`` with ``GOMP_SPINCOUNT=300000`` set, libgomp's own
  default (idle threads spin 300,000 times before they sleep): what every process did before issue 16;
- ``3 passive``: ``OMP_WAIT_POLICY=passive`` set by the caller (the same as ``3 default`` since issue 16).

Per arm it reports the slowest client's seconds per training step (``seconds_train_max`` / ``local_steps``)
of the rounds after the first, and the first round's exchange seconds (which also holds each client's one
pass of the frozen encoder over its data: forward-only work). Arms run one after another, in a rotated order
each repeat; medians and ranges over repeats. The machine's other load shows in every arm.

    python -m simulations.bench.one_machine [--examples-per-client 1500] [--local-steps 10] [--rounds 3] [--repeats 2]

Measured on 2 cores shared with other jobs (load 10-20), 2 repeats, s per step, median [min, max]:

    before issue 16 (CLIs left libgomp's spinning default)   after (CLIs default to a passive wait)
    alone          1.31                                      alone          0.13 [0.07, 0.19]
    3 default      1.94 [1.26, 2.62]                         alone spin     0.55 [0.29, 0.81]
    3 threads=1    0.52 [0.27, 0.76]                         3 default      0.20 [0.18, 0.22] = 1.5x alone
    3 passive      0.21 [0.20, 0.21]                         3 spin         1.43 [1.27, 1.59] = 2.6x alone spin
                                                             3 threads=1    0.29 [0.27, 0.31]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from localio.data import read_examples, write_jsonl
from simulations.harness.local_cluster import REPO, process_env, start_client, start_coordinator, tail, wait_all

EXAMPLE = REPO / "coordinator" / "examples" / "wordnet-lora.toml"
TRAIN = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.train.jsonl.gz"
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"

# name: (clients, client --threads (0 = the CLI's default), environment variables set for every process)
ARMS: dict[str, tuple[int, int, dict[str, str]]] = {
    "alone": (1, 0, {}),
    "alone spin": (1, 0, {"GOMP_SPINCOUNT": "300000"}),
    "3 default": (3, 0, {}),
    "3 spin": (3, 0, {"GOMP_SPINCOUNT": "300000"}),
    "3 threads=1": (3, 1, {}),
    "3 passive": (3, 0, {"OMP_WAIT_POLICY": "passive"}),
}
DEFAULT_ARMS = ["alone", "alone spin", "3 default", "3 spin", "3 threads=1"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = process_env()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(key, None)  # what a user's shell has: none of them
    return {**env, **extra}


def run_arm(work: Path, name: str, shards: list[Path], args: argparse.Namespace) -> dict[str, float]:
    clients, threads, extra_env = ARMS[name]
    folder = Path(tempfile.mkdtemp(prefix=name.replace(" ", "-").replace("=", "") + "-", dir=work))
    body = EXAMPLE.read_text()
    for old, new in (("rounds = 5", f"rounds = {args.rounds}"),
                     ("clients_per_round = 3", f"clients_per_round = {clients}"),
                     ("min_clients = 2", f"min_clients = {clients}"),
                     ("local_steps = 30", f"local_steps = {args.local_steps}"),
                     ('validation = "data/', f'validation = "{VALIDATION.parent}/'),
                     ("validation_max_examples = 2000", "validation_max_examples = 200")):
        if old not in body:
            raise SystemExit(f"the example job changed: {old!r} is gone")
        body = body.replace(old, new)
    tokens = [f"bench-token-{i}" for i in range(clients)]
    (folder / "tokens.txt").write_text("\n".join(tokens) + "\n")
    job = folder / "job.toml"
    job.write_text(body)
    env = _env(extra_env)
    out = folder / "run"
    coordinator, address = start_coordinator(job, out, env=env)
    extra = ("--threads", str(threads)) if threads else ()
    procs = [start_client(address, shards[i], tokens[i], folder / f"client{i}", *extra, env=env)
             for i in range(clients)]
    codes = wait_all([coordinator, *procs], timeout_s=3600)
    if any(codes):
        raise SystemExit(f"{name}: a process failed ({codes}):\n{tail(folder / 'run.coordinator.log')}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("round", 0) >= 1]
    later = [r["seconds_train_max"] / args.local_steps for r in rounds[1:]]
    return {"step_s": statistics.median(later), "first_round_s": rounds[0]["seconds_exchange"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples-per-client", type=int, default=1500)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arms", nargs="*", default=DEFAULT_ARMS, choices=list(ARMS))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedsite-bench-one-machine-"))
    examples = read_examples(TRAIN, need_label=True)
    random.Random(0).shuffle(examples)
    shards = []
    for i in range(3):
        shards.append(work / f"shard-{i}.jsonl")
        write_jsonl(shards[-1], examples[i * args.examples_per_client: (i + 1) * args.examples_per_client])
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.arms}
    for repeat in range(args.repeats):
        order = args.arms[repeat % len(args.arms):] + args.arms[:repeat % len(args.arms)]
        for name in order:
            results[name].append(run_arm(work, name, shards, args))
            print(f"repeat {repeat} {name}: {results[name][-1]}", flush=True)
    print(f"{os.cpu_count()} cores; {args.examples_per_client} examples per client, {args.local_steps} steps, "
          f"{args.rounds} rounds, {args.repeats} repeats; median [min, max]")
    alone = statistics.median(r["step_s"] for r in results["alone"]) if "alone" in results else None
    for name, runs in results.items():
        steps = [r["step_s"] for r in runs]
        firsts = [r["first_round_s"] for r in runs]
        step = statistics.median(steps)
        ratio = f" = {step / alone:.2f}x alone" if alone else ""
        print(f"  {name:12s} s/step {step:.3f} [{min(steps):.3f}, {max(steps):.3f}]{ratio}; "
              f"first round {statistics.median(firsts):.1f} s [{min(firsts):.1f}, {max(firsts):.1f}]")
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
