"""The SecAgg+ communication graph and per-neighbourhood thresholds.

SecAgg+ (Bell et al. 2020) replaces SecAgg's complete graph by a k-regular
graph of degree O(log n): each client exchanges keys, shares and pairwise masks
with its k neighbours only, so client work and bytes grow with log n instead
of n. We use a Harary graph (each client joined to the k/2 nearest on either
side of a ring) over a random permutation of the clients, like Flower's
SecAgg+ workflow: it is k-regular and k-connected for any n.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def default_neighbourhood_size(num_clients: int) -> int:
    """2*ceil(log2 n) + 1 (the client and an even number of neighbours), capped at n."""
    degree = 2 * math.ceil(math.log2(max(num_clients, 2)))
    return min(num_clients, degree + 1)


def effective_neighbourhood_size(num_clients: int, neighbourhood_size: int | None) -> int:
    """The neighbourhood size actually used for `num_clients` clients (never above n)."""
    size = default_neighbourhood_size(num_clients) if neighbourhood_size is None else neighbourhood_size
    return min(size, num_clients)


def threshold_count(fraction: float, neighbourhood_size: int) -> int:
    """Members of a neighbourhood of this size needed to unmask: ceil(fraction * size), > size/2."""
    count = math.ceil(fraction * neighbourhood_size - 1e-9)
    return max(count, neighbourhood_size // 2 + 1)


def build_graph(client_ids: Sequence[int], neighbourhood_size: int, rng: random.Random) -> dict[int, tuple[int, ...]]:
    """Neighbours (sorted, self excluded) of every client.

    neighbourhood_size counts the client itself; if it is n or more the graph is
    complete (plain SecAgg), otherwise it must be odd (an even degree).
    """
    n = len(client_ids)
    if n >= 2 and neighbourhood_size >= n:
        return {c: tuple(sorted(set(client_ids) - {c})) for c in client_ids}
    if neighbourhood_size < 3 or neighbourhood_size % 2 == 0:
        raise ValueError(
            f"neighbourhood size must be odd and >= 3 when below the client count, "
            f"got {neighbourhood_size} for {n} clients"
        )
    order = list(client_ids)
    rng.shuffle(order)
    half = (neighbourhood_size - 1) // 2
    return {
        cid: tuple(sorted(order[(pos + off) % n] for off in range(-half, half + 1) if off != 0))
        for pos, cid in enumerate(order)
    }


def share_index(owner: int, holder: int, neighbours_of_owner: Sequence[int]) -> int:
    """Shamir x-coordinate (from 1) of the share of `owner`'s secrets held by `holder`.

    It is the holder's position in the sorted neighbourhood of the owner (owner
    included), which both the owner and the server can compute from the graph.
    """
    members = sorted([owner, *neighbours_of_owner])
    return members.index(holder) + 1
