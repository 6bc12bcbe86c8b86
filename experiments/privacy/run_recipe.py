"""One private-training experiment: a job file (plus overrides) run through fedsite's own round
engine and client runtime in this process; appends a JSON line to results.jsonl.

The job runs exactly as ``fedsite-simulate`` runs it (same package, partition, round engine,
trainer, Opacus DP-SGD, ε ledger and, when on, SecAgg+), with the clients as in-process
runtimes instead of Ray actors, so a sweep costs compute, not start-up. At the end the global
model is scored on the *whole* validation split (11,648 synsets; the job itself evaluates a
sample each round).

    python experiments/privacy/run_recipe.py --tag NAME [--job simulations/configs/default.toml] \
        [--set train.batch_size=512 privacy.local_dp.target_epsilon=8 ...] [--central]

``--central`` is the reference without federation: one client holding all the job's training
examples (the same ones), one round of ``rounds x local_steps`` steps, no secure aggregation.
Tune on the validation split only: the test split is held back for independent evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from client.runtime import ClientRuntime  # noqa: E402
from coordinator.config import JobConfig, load_job  # noqa: E402
from coordinator.job import prepare_job  # noqa: E402
from emulator.cache_dir import fedsite_cache_dir  # noqa: E402
from emulator.package import load_trainable_model  # noqa: E402
from emulator.tasks import encode, evaluate  # noqa: E402
from localio.data import read_examples  # noqa: E402
from simulations.harness.inprocess import InProcessDriver  # noqa: E402
from simulations.runner import SimulationOptions, apply_overrides, partition_table  # noqa: E402


def set_key(config: JobConfig, dotted: str, raw: str) -> None:
    """``section.key=value`` (``privacy.local_dp.target_epsilon=8``); the value is parsed as TOML, and
    ``none`` unsets an optional key (``privacy.local_dp.target_epsilon=none``)."""
    import tomllib

    *path, key = dotted.split(".")
    target: Any = config
    for part in path:
        target = getattr(target, part)
    if not hasattr(target, key):
        raise SystemExit(f"unknown key {dotted}")
    value = None if raw == "none" else tomllib.loads(f"v = {raw}")["v"]  # "none": back to the key's default
    setattr(target, key, value)


def centralised(config: JobConfig) -> JobConfig:
    """The same examples and steps, one client, one round, no federation machinery."""
    central = copy.deepcopy(config)
    assert central.simulation is not None
    central.train.local_steps = config.job.rounds * config.train.local_steps
    central.job.rounds = 1
    central.job.clients_per_round = central.job.min_clients = 1
    central.simulation.clients = 1
    central.simulation.partition = "iid"
    central.privacy.secure_aggregation.enabled = False
    return central


def run(config: JobConfig, output_dir: Path, threads: int, val_examples: int = 0) -> dict[str, Any]:
    torch.set_num_threads(threads)
    start = time.monotonic()
    prepared = prepare_job(config, output_dir)
    assert config.simulation is not None
    table = partition_table(config)
    rows = read_examples(config.resolve(config.simulation.train_data), need_label=True)
    # one model object for every client, as in a simulation actor (each message sets all trainable tensors)
    model, tokenizer, spec = load_trainable_model(prepared.package.folder)
    label2id = {label: i for i, label in enumerate(spec.labels)}
    runtimes: dict[str, ClientRuntime] = {}
    for index, part in enumerate(table):
        data = encode([rows[i] for i in part], tokenizer, task=spec.task, max_length=spec.max_length,
                      label2id=label2id)
        state_dir = output_dir / "clients" / str(index)
        state_dir.mkdir(parents=True, exist_ok=True)
        runtimes[f"client-{index:03d}"] = ClientRuntime(model=model, spec=spec, data=data, state_dir=state_dir,
                                                        prefix_cache_dir=fedsite_cache_dir() / "frozen-prefix")
    records = prepared.engine.run(InProcessDriver(runtimes))
    seconds = time.monotonic() - start
    validation = read_examples(config.resolve(config.data.validation), need_label=True)
    if 0 < val_examples < len(validation):  # a fixed seeded subset: sweeps; the whole split: final candidates
        validation = random.Random(1).sample(validation, val_examples)
    encoded = encode(validation, tokenizer, task=spec.task, max_length=spec.max_length, label2id=label2id)
    final = evaluate(prepared.model.model, encoded, batch_size=128)
    return {"records": records, "seconds": seconds, "val_accuracy_full": final["val_accuracy"],
            "val_loss_full": final["val_loss"], "validation_examples": len(encoded),
            "client_examples": [len(p) for p in table]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--job", default=str(ROOT / "simulations" / "configs" / "default.toml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--central", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-examples", type=int, default=0, help="score on a seeded subset (0 = the whole split)")
    ap.add_argument("--pooler-scale", type=float, default=None, help="override emulator.pooling.POOLER_SCALE")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("transformers", "fedsite.job"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.pooler_scale is not None:
        import emulator.pooling

        emulator.pooling.POOLER_SCALE = args.pooler_scale
    config = load_job(args.job)
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(config, key, value)
    config = apply_overrides(config, SimulationOptions())
    if args.central:
        config = centralised(config)
    config.validate()
    with tempfile.TemporaryDirectory(prefix="fedsite-recipe-") as tmp:
        out = run(config, Path(tmp) / "run", args.threads, args.val_examples)
    records = out.pop("records")
    last = records[-1]
    failed = [r["round"] for r in records[1:] if r.get("status") != "ok"]
    if failed:
        print(f"rounds {failed} failed: {records[failed[0]].get('failure')}; nothing recorded", file=sys.stderr)
        return 1
    import emulator.pooling

    line = {"tag": args.tag, "job": os.path.relpath(args.job, ROOT), "set": args.set, "central": args.central,
            "pooler_scale": emulator.pooling.POOLER_SCALE,
            "threads": args.threads, **out,
            "epsilon_local_max": last.get("epsilon_local_max"),
            "noise_multiplier_local": last.get("noise_multiplier_local"),
            "rounds": [{k: r.get(k) for k in ("round", "val_accuracy", "train_loss", "completed_clients",
                                               "epsilon_local_max", "seconds")} for r in records],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")
    print(json.dumps({k: line[k] for k in ("tag", "val_accuracy_full", "epsilon_local_max", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
