"""Benchmark (not a test): what one federated LoRA round costs, over real gRPC on loopback.

Runs the shipped example job (MiniLM + WordNet, lora mode) with real
coordinator and client processes and prints, per round:
- bytes per client per round, down and up, as a fraction of the full model's bytes;
- seconds per round split into client training (slowest client), transfer and
  waiting (the exchange minus training), aggregation and evaluation.

    python -m simulations.bench.rounds [--clients 3] [--rounds 2] [--local-steps 30]

Figures are from one run on a shared machine: read the fractions and the split,
not the absolute seconds. The example trains only the pooler and the head over
each client's cached frozen encoder: the first round includes that one pass over
the client's data; later rounds are the steady state.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from emulator.models import embedded_model_path
from localio.data import read_examples, write_jsonl
from simulations.harness.local_cluster import REPO, start_client, start_coordinator, tail, wait_all

EXAMPLE = REPO / "coordinator" / "examples" / "wordnet-lora.toml"
TRAIN = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.train.jsonl.gz"
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def full_model_bytes() -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(embedded_model_path() / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            t = handle.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * 4
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=30)
    # the example trains at Poisson batches of 1,024 under DP: a client needs several batches of data
    parser.add_argument("--examples-per-client", type=int, default=8000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedsite-bench-rounds-"))
    body = EXAMPLE.read_text()
    body = body.replace("rounds = 5", f"rounds = {args.rounds}")
    body = body.replace("clients_per_round = 3", f"clients_per_round = {args.clients}")
    body = body.replace("local_steps = 30", f"local_steps = {args.local_steps}")
    body = body.replace('validation = "data/', f'validation = "{VALIDATION.parent}/')
    body = body.replace("validation_max_examples = 2000", "validation_max_examples = 500")
    tokens = [f"bench-token-{i}" for i in range(args.clients)]
    (work / "tokens.txt").write_text("\n".join(tokens) + "\n")
    job = work / "job.toml"
    job.write_text(body)
    examples = read_examples(TRAIN, need_label=True)
    random.Random(0).shuffle(examples)
    shards = []
    for i in range(args.clients):
        shard = work / f"shard-{i}.jsonl"
        write_jsonl(shard, examples[i * args.examples_per_client : (i + 1) * args.examples_per_client])
        shards.append(shard)

    out = work / "run"
    coordinator, address = start_coordinator(job, out)
    clients = [start_client(address, shards[i], tokens[i], work / f"client{i}") for i in range(args.clients)]
    codes = wait_all([coordinator, *clients], timeout_s=3600)
    if any(codes):
        raise SystemExit(f"a process failed ({codes}):\n{tail(work / 'run.coordinator.log')}")

    model_bytes = full_model_bytes()
    package_bytes = (out / "package.tar").stat().st_size
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"full model: {model_bytes / 1e6:.1f} MB (fp32); job package downloaded once per client: "
          f"{package_bytes / 1e6:.1f} MB ({package_bytes / model_bytes:.2f} x the model)")
    print("| round | clients | down/client (frac. of model) | up/client (frac.) | round s | train | transfer+wait "
          "| aggregate | eval |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records[1:]:
        k = max(r["completed_clients"], 1)
        seconds = r["seconds"]
        train = r.get("seconds_train_max", 0.0)
        transfer = max(r.get("seconds_exchange", 0.0) - train, 0.0)
        print(f"| {r['round']} | {r['completed_clients']} | {r['bytes_down'] / k / model_bytes:.5f} "
              f"| {r['bytes_up'] / k / model_bytes:.5f} | {seconds:.1f} | {train / seconds:.0%} "
              f"| {transfer / seconds:.0%} | {r.get('seconds_aggregate', 0.0) / seconds:.1%} "
              f"| {r.get('seconds_eval', 0.0) / seconds:.0%} |")
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
