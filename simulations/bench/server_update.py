"""Benchmark (not a test): the coordinator's own work per update in a plain round, before and after issue 16.

Measures, per accepted update, the server-side CPU of ``coordinator.plain_phase``: the update's checks (names,
shapes, dtype, finiteness), its L2 norm for the bound, the content digest that fixes the summation order, and
its share of the weighted mean. No transport, decoding or training: the updates are already tensors.

Two arms, interleaved in one process and repeated:
- ``before``: the path as it was (a ``torch.isfinite`` pass over every tensor, then the norm, then a SHA-256 of
  every update re-serialised with ``tobytes``), kept below as a frozen copy;
- ``after``: what ``plain_client_phase`` runs now (``check_update`` derives finiteness from the norm and
  returns it; ``aggregation_order`` orders by weight and an update's first bytes, and hashes tensor memory in
  place only for updates that tie on both).

Each under two weightings: distinct example counts, and equal weights (client-level DP: every update hashed).

    python -m simulations.bench.server_update [--floats 1000000] [--tensors 128] [--clients 10] [--repeats 7]

Prints milliseconds per update (median and range over repeats) and the after/before ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from coordinator.plain_phase import aggregation_order
from coordinator.strategy import State, UpdateRejected, check_update, update_norm, weighted_mean


def _before_check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Frozen copy of ``check_update`` before issue 16 (a finiteness pass per tensor)."""
    for name, ref in expected.items():
        value = update[name]
        if value.dtype != torch.float32 or tuple(value.shape) != tuple(ref.shape):
            raise UpdateRejected(name)
        if not torch.isfinite(value).all():
            raise UpdateRejected(f"{name}: non-finite values")


def _before_digest(state: State) -> str:
    """Frozen copy of the digest before issue 16 (each tensor copied out with ``tobytes``)."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(state[name].numpy().tobytes())
    return hasher.hexdigest()


def before(updates: list[State], weights: list[float], expected: State) -> State:
    for update in updates:
        _before_check_update(update, expected)
        update_norm(update)
    order = sorted(range(len(updates)), key=lambda i: (weights[i], _before_digest(updates[i])))
    return weighted_mean([updates[i] for i in order], [weights[i] for i in order])


def after(updates: list[State], weights: list[float], expected: State) -> State:
    for update in updates:
        check_update(update, expected)
    order = aggregation_order(updates, weights)
    return weighted_mean([updates[i] for i in order], [weights[i] for i in order])


def make_updates(floats: int, tensors: int, clients: int, seed: int = 0) -> tuple[list[State], State]:
    generator = torch.Generator().manual_seed(seed)
    size = max(1, floats // tensors)
    expected = {f"layer{i}.lora": torch.zeros(size) for i in range(tensors)}
    updates = [{name: torch.randn(size, generator=generator) * 1e-3 for name in expected} for _ in range(clients)]
    return updates, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floats", type=int, default=1_000_000, help="floats per update")
    parser.add_argument("--tensors", type=int, default=128, help="tensors per update (a LoRA update has many)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    updates, expected = make_updates(args.floats, args.tensors, args.clients)
    weightings = {"distinct weights": [float(100 + i) for i in range(args.clients)],
                  "equal weights": [1.0] * args.clients}
    arms: dict[str, Callable[[list[State], list[float], State], State]] = {"before": before, "after": after}
    for label, weights in weightings.items():  # the same mean (summed in another order), or it means nothing
        reference = before(updates, weights, expected)
        result = after(updates, weights, expected)
        if any(not torch.allclose(reference[n], result[n], rtol=1e-5, atol=1e-9) for n in reference):
            raise SystemExit(f"{label}: the two arms aggregate differently")
    times: dict[tuple[str, str], list[float]] = {(a, w): [] for a in arms for w in weightings}
    rng = random.Random(0)
    for _ in range(args.repeats):
        runs = list(times)
        rng.shuffle(runs)  # interleaved, in a new order each repeat
        for arm, label in runs:
            start = time.perf_counter()
            arms[arm](updates, weightings[label], expected)
            times[(arm, label)].append((time.perf_counter() - start) / args.clients * 1e3)
    print(f"{args.floats:,} floats in {args.tensors} tensors, {args.clients} updates, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}; ms per update, median [min, max]")
    for label in weightings:
        medians = {}
        for arm in arms:
            values = times[(arm, label)]
            medians[arm] = statistics.median(values)
            print(f"  {label:16s} {arm:6s} {medians[arm]:8.2f} [{min(values):.2f}, {max(values):.2f}]")
        ratio = medians["after"] / medians["before"] if medians["before"] > 0 else math.nan
        print(f"  {label:16s} after/before {ratio:.2f}")


if __name__ == "__main__":
    main()
