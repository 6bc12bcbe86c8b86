"""Test data and job files for the end-to-end runs; processes come from simulations.harness.local_cluster."""

from __future__ import annotations

import random
from pathlib import Path

from localio.data import Example, read_examples, write_jsonl
from simulations.harness.local_cluster import REPO, start_client, start_coordinator, tail, wait_all, wait_for_text

DATA = REPO / "coordinator" / "examples" / "data"
TRAIN = DATA / "wordnet_supersense.train.jsonl.gz"
VALIDATION = DATA / "wordnet_supersense.validation.jsonl.gz"
TOKENS = ["tok-alpha", "tok-bravo", "tok-charlie", "tok-delta", "tok-echo"]

__all__ = ["TOKENS", "TRAIN", "VALIDATION", "disjoint_shards", "start_client", "start_coordinator", "tail",
           "wait_all", "wait_for_text", "write_job"]


def write_job(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    path = folder / "job.toml"
    path.write_text(body.replace("@VALIDATION@", str(VALIDATION)))
    return path


def disjoint_shards(folder: Path, clients: int, per_client: int, seed: int = 0) -> list[Path]:
    """Disjoint slices of the training file, one per client."""
    examples: list[Example] = read_examples(TRAIN, need_label=True)
    random.Random(seed).shuffle(examples)
    paths = []
    for i in range(clients):
        path = folder / f"shard-{i}.jsonl"
        write_jsonl(path, examples[i * per_client : (i + 1) * per_client])
        paths.append(path)
    return paths
