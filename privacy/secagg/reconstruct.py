"""Rebuilding the secrets the SecAgg+ server needs at unmask, and finding who sent a bad share.

The server needs each included client's self-mask seed and each dropped
client's mask key, each from `threshold` Shamir shares its neighbours hold.
Every rebuilt secret is verified (the seed against its commitment, the key
against its public key), so a neighbour that sends a wrong share cannot make
the server unmask with a wrong secret: it is named and left out instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from privacy.secagg.crypto import combine_secret, combine_secrets
from privacy.secagg.errors import SecAggAborted
from privacy.secagg.graph import share_index

MAX_SUBSETS = 64  # random share subsets tried when a reconstruction fails verification

#: a secret to rebuild at unmask: owner, its (holder, share) pairs, a check of the result, its name
Wanted = tuple[int, list[tuple[int, bytes]], Callable[[bytes], bool], str]
#: the single-secret search: (owner, shares, verify, what, first_failed) -> the secret
Fallback = Callable[..., bytes]


def _combine_one(points: list[tuple[int, bytes]]) -> bytes:
    return combine_secrets([points])[0]


def reconstruct_all(wanted: list[Wanted], threshold: int, neighbours: Mapping[int, Sequence[int]],
                    fallback: Fallback) -> list[bytes]:
    """Every secret in `wanted`, rebuilt in one batch, then verified one by one.

    Each secret is first rebuilt from the shares of its `threshold` lowest-id
    holders, as :func:`reconstruct` does (so the same holders are audited by the
    verification); without dropouts those are the same share indices for
    every owner, one set of Lagrange coefficients for the whole batch. A
    secret that fails verification goes to `fallback` (the server's
    :func:`reconstruct`) with ``first_failed=True``, to search for a clean subset.
    """
    first: list[list[tuple[int, bytes]]] = []
    for owner, shares, _, _ in wanted:
        members = sorted([owner, *neighbours[owner]])
        position = {member: i + 1 for i, member in enumerate(members)}  # share_index for every holder
        first.append([(position[holder], share) for holder, share in shares[:threshold]])
    rebuilt = combine_secrets(first)
    return [
        secret if verify(secret) else fallback(owner, shares, verify, what, first_failed=True)
        for secret, (owner, shares, verify, what) in zip(rebuilt, wanted, strict=True)
    ]


def reconstruct(owner: int, shares: list[tuple[int, bytes]], verify: Callable[[bytes], bool], what: str, *,
                threshold: int, neighbours: Sequence[int], round_id: int, batched: bool,
                reject: Callable[[int, str], None], first_failed: bool = False) -> bytes:
    """Rebuild `owner`'s secret from `threshold` of its (holder, share) pairs.

    The result is verified (commitment or public key). If it fails, some holder
    sent a bad share: random subsets are tried (with one bad share among 15 and a
    threshold of 10, one subset in three is clean), the culprits are passed to
    `reject`, and only when no clean subset turns up does the round abort
    (SecAggAborted). `first_failed` skips the first attempt when
    :func:`reconstruct_all` already made it. Without `batched`, every attempt is
    one pycryptodome `Shamir.combine` (the earlier path).
    """
    t = threshold
    points = [(share_index(owner, h, neighbours), s) for h, s in shares]
    combine = _combine_one if batched else combine_secret
    if not first_failed:
        secret = combine(points[:t])
        if verify(secret):
            return secret
    rng = random.Random(owner)
    for _ in range(MAX_SUBSETS):
        good = rng.sample(range(len(points)), t)
        secret = combine([points[i] for i in good])
        if verify(secret):
            base = [points[j] for j in good[1:]]
            for i in sorted(set(range(len(points))) - set(good)):
                if not verify(combine([*base, points[i]])):
                    reject(shares[i][0], f"sent a bad share of client {owner}'s {what}")
            return secret
    raise SecAggAborted(
        f"round {round_id} at unmask: the {what} of client {owner} rebuilt "
        "from its shares fails verification (neighbours sent bad shares)"
    )
