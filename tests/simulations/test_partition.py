"""Partitioners (flwr-datasets) on the real WordNet labels, and the simulator's partition table."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from coordinator.config import parse_job
from localio.data import read_examples
from localio.partition import partition_indices
from simulations.runner import partition_table

DATA = Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "data"
TRAIN = DATA / "wordnet_supersense.train.jsonl.gz"


@pytest.fixture(scope="module")
def labels() -> list[str]:
    rows = read_examples(TRAIN, need_label=True)  # the file is grouped by label: draw a seeded sample
    return [rows[i].label for i in sorted(random.Random(0).sample(range(len(rows)), 4000))]  # type: ignore[misc]


def _skew(labels: list[str], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the global one (0 = IID)."""
    total = Counter(labels)
    distances = []
    for part in parts:
        local = Counter(labels[i] for i in part)
        distances.append(0.5 * sum(abs(local[k] / len(part) - total[k] / len(labels)) for k in total))
    return sum(distances) / len(distances)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_every_example_lands_in_exactly_one_client(labels: list[str], partition: str) -> None:
    parts = partition_indices(labels, 12, partition=partition, alpha=0.5, seed=3)
    assert len(parts) == 12 and all(parts)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(labels)))  # no loss, no duplicate
    assert parts == partition_indices(labels, 12, partition=partition, alpha=0.5, seed=3)  # seeded


def test_dirichlet_skew_grows_as_alpha_shrinks(labels: list[str]) -> None:
    skew = {alpha: sum(_skew(labels, partition_indices(labels, 10, partition="dirichlet", alpha=alpha, seed=s))
                       for s in range(3)) / 3
            for alpha in (0.1, 0.5, 1.0, 100.0)}
    iid = _skew(labels, partition_indices(labels, 10, partition="iid", seed=0))
    assert skew[0.1] > skew[0.5] > skew[1.0] > skew[100.0], skew
    assert skew[0.1] > 0.5 and iid < 0.15, (skew, iid)
    # fewer distinct labels per client as alpha shrinks (each client sees a narrower mix)
    def entropy(parts: list[list[int]]) -> float:
        values = []
        for part in parts:
            counts = Counter(labels[i] for i in part)
            values.append(-sum(c / len(part) * math.log(c / len(part)) for c in counts.values()))
        return sum(values) / len(values)

    assert entropy(partition_indices(labels, 10, partition="dirichlet", alpha=0.1, seed=0)) < \
        entropy(partition_indices(labels, 10, partition="dirichlet", alpha=1.0, seed=0))


def test_partition_table_samples_then_splits_the_training_file(tmp_path: Path) -> None:
    config = parse_job({
        "job": {"seed": 7}, "model": {"labels": []},
        "simulation": {"clients": 8, "partition": "dirichlet", "alpha": 0.5, "train_data": str(TRAIN),
                       "max_train_examples": 1500},
    }, tmp_path)
    table = partition_table(config)
    flat = sorted(i for part in table for i in part)
    assert len(table) == 8 and len(flat) == 1500 and len(set(flat)) == 1500
    assert flat[-1] > 4000  # drawn from the whole file, not its head
    assert table == partition_table(config)
    config.job.seed = 8
    assert partition_table(config) != table
