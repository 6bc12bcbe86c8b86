"""Splitting one labelled file among clients, with flwr-datasets' partitioners.

IID, Dirichlet-by-label (smaller alpha = each client sees fewer labels) and
McMahan-style label shards. Used by the simulator and by
``fedsite-client split`` to make per-client files for real deployments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from localio.data import DataError, Example, read_examples, write_jsonl

PARTITIONS = ("iid", "dirichlet", "shards")


def partition_indices(labels: Sequence[str | None], num_clients: int, *, partition: str, alpha: float = 0.5,
                      seed: int = 0, shards_per_client: int = 2) -> list[list[int]]:
    """Example indices for each client; every index lands in exactly one client."""
    from datasets import Dataset  # noqa: PLC0415 - heavy (pyarrow), only when a file is split
    from flwr_datasets.partitioner import (  # noqa: PLC0415 - heavy, only when a file is split
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    if num_clients < 1:
        raise DataError("the number of clients must be >= 1")
    if num_clients > len(labels):
        raise DataError(f"cannot split {len(labels)} examples among {num_clients} clients")
    dataset = Dataset.from_dict({"label": [str(x) for x in labels], "idx": list(range(len(labels)))})
    partitioner: Partitioner
    if partition == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif partition == "dirichlet":
        min_size = max(1, min(10, len(labels) // (4 * num_clients)))
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                           min_partition_size=min_size, self_balancing=False, seed=seed)
    elif partition == "shards":
        dataset = dataset.class_encode_column("label")
        # shard size rounded up with the last shard kept incomplete, so no example is dropped
        shard_size = -(-len(labels) // (num_clients * shards_per_client))
        partitioner = ShardPartitioner(num_partitions=num_clients, partition_by="label",
                                       shard_size=shard_size, keep_incomplete_shard=True, seed=seed)
    else:
        raise DataError(f"unknown partition {partition!r}; use one of {', '.join(PARTITIONS)}")
    if partition == "iid":
        dataset = dataset.shuffle(seed=seed)
    partitioner.dataset = dataset
    return [sorted(partitioner.load_partition(i)["idx"]) for i in range(num_clients)]


def partition_examples(examples: Sequence[Example], num_clients: int, **kwargs: object) -> list[list[Example]]:
    parts = partition_indices([e.label for e in examples], num_clients, **kwargs)  # type: ignore[arg-type]
    return [[examples[i] for i in part] for part in parts]


def split_file(path: Path, num_clients: int, output_dir: Path, *, partition: str = "iid", alpha: float = 0.5,
               seed: int = 0) -> list[Path]:
    examples = read_examples(path, need_label=partition != "iid")
    parts = partition_examples(examples, num_clients, partition=partition, alpha=alpha, seed=seed)
    paths = []
    for i, part in enumerate(parts):
        out = output_dir / f"client-{i:03d}.jsonl"
        write_jsonl(out, part)
        paths.append(out)
    return paths
