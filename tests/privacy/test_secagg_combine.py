"""Batched Shamir reconstruction (crypto.combine_secrets) against pycryptodome's scalar combine.

Shares are made by the clients' own `split_secret` (pycryptodome), so these tests also pin the
share format: same field, same byte order, same indices.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytest
from Crypto.Protocol import SecretSharing

from privacy.secagg import SecAggPlusServer, Stage, crypto
from tests.privacy.test_secagg_driver import make_inputs, new_round, run_round

_Element: Any = SecretSharing._Element  # pycryptodome's GF(2^128) element (untyped in its stubs)


def _random_element(rng: random.Random) -> int:
    return rng.getrandbits(128)


def test_field_arithmetic_matches_pycryptodome() -> None:
    rng = random.Random(1)
    for _ in range(300):
        a, b = _random_element(rng), _random_element(rng)
        assert crypto._gf_mul(a, b) == int(_Element(a) * _Element(b))
        if a:
            assert crypto._gf_inv(a) == int(_Element(a).inverse())
            assert crypto._gf_mul(a, crypto._gf_inv(a)) == 1
    for small in range(1, 64):  # share indices are small: products of them need reducing too
        assert crypto._gf_mul(small, 1 << 127) == int(_Element(small) * _Element(1 << 127))


def _shared(rng: random.Random, width: int, threshold: int, count: int) -> tuple[bytes, list[bytes]]:
    secret = rng.randbytes(width)
    return secret, crypto.split_secret(secret, threshold, count)


@pytest.mark.parametrize("seed", range(4))
def test_batch_equals_scalar_combine_on_mixed_secrets(seed: int) -> None:
    """One batch of 16- and 32-byte secrets, thresholds 2..9, exactly or more than the
    threshold of shares, over many different index sets and some repeated ones."""
    rng = random.Random(seed)
    batch: list[list[tuple[int, bytes]]] = []
    expected: list[bytes] = []
    for _ in range(120):
        threshold = rng.randint(2, 9)
        count = threshold + rng.randint(0, 6)
        secret, shares = _shared(rng, rng.choice([16, 32]), threshold, count)
        used = rng.sample(range(1, count + 1), rng.choice([threshold, rng.randint(threshold, count)]))
        points = [(x, shares[x - 1]) for x in used]
        batch.append(points)
        expected.append(secret)
        if len(used) == threshold:  # pycryptodome wants exactly the threshold
            assert crypto.combine_secret(points) == secret
    # repeat a few index sets many times so they take the table path (>= 4 blocks per set)
    for _ in range(3):
        threshold, count = rng.randint(2, 12), 25
        used = sorted(rng.sample(range(1, count + 1), threshold))
        for _ in range(rng.randint(4, 40)):
            secret, shares = _shared(rng, rng.choice([16, 32]), threshold, count)
            batch.append([(x, shares[x - 1]) for x in used])
            expected.append(secret)
    order = list(range(len(batch)))
    rng.shuffle(order)
    got = crypto.combine_secrets([batch[i] for i in order])
    assert got == [expected[i] for i in order]


@pytest.mark.parametrize("copies", [1, 3, 4, 50])
def test_table_and_direct_paths_agree(copies: int) -> None:
    """Below and above the table threshold, one index set, threshold 20 of 29 (n = 10,000's)."""
    rng = random.Random(copies)
    secrets = [rng.randbytes(16) for _ in range(copies)]
    index = sorted(rng.sample(range(1, 30), 20))
    batch = []
    for secret in secrets:
        shares = crypto.split_secret(secret, 20, 29)
        batch.append([(x, shares[x - 1]) for x in index])
    assert crypto.combine_secrets(batch) == secrets
    assert crypto.combine_secret(batch[0]) == secrets[0]


@pytest.mark.parametrize("spread", [30, 300, 2**100])
def test_any_index_set_recovers_the_constant_term(spread: int) -> None:
    """Lagrange at 0 from a random polynomial evaluated (by pycryptodome's field) at random
    indices: small ones (neighbourhood positions, coefficients cached per max index, with
    indices absent below the max) and large ones (the direct formula)."""
    rng = random.Random(spread)
    for _ in range(20):
        degree = rng.randint(0, 12)
        poly = [_Element(rng.getrandbits(128)) for _ in range(degree + 1)]
        xs = list({rng.randrange(1, spread) for _ in range(degree + 1 + rng.randint(0, 3))})
        if len(xs) < degree + 1:  # a collision among the small ones: too few points this time
            continue

        def at(x: int, poly: list[Any] = poly) -> bytes:
            y = _Element(0)
            for c in reversed(poly):
                y = y * _Element(x) + c
            return bytes(y.encode())

        secret = bytes(poly[0].encode())
        points = [(x, at(x)) for x in xs]
        assert crypto.combine_secrets([points]) == [secret]  # multiplied out directly
        assert crypto.combine_secrets([points] * 40) == [secret] * 40  # through the tables


def test_share_order_does_not_matter_and_too_few_shares_give_garbage() -> None:
    rng = random.Random(5)
    secret, shares = _shared(rng, 32, 5, 9)
    points = [(x, shares[x - 1]) for x in (9, 2, 7, 4, 1)]
    assert crypto.combine_secrets([points, points[::-1]]) == [secret, secret]
    assert crypto.combine_secrets([points[:4]])[0] != secret


def test_bad_input_is_refused() -> None:
    share = os.urandom(16)
    with pytest.raises(ValueError, match="duplicate"):
        crypto.combine_secrets([[(1, share), (1, share)]])
    with pytest.raises(ValueError, match="share index"):
        crypto.combine_secrets([[(0, share), (1, share)]])
    with pytest.raises(ValueError, match="same non-zero multiple"):
        crypto.combine_secrets([[(1, share), (2, share + share)]])
    with pytest.raises(ValueError, match="no shares"):
        crypto.combine_secrets([[]])
    assert crypto.combine_secrets([]) == []


def _round(batched: bool, n: int, drop: dict[str, set[int]], seed: int) -> SecAggPlusServer:
    server, clients = new_round(n, size=48)
    server.batch_reconstruction = batched
    if batched:  # with honest shares every batched secret must verify: no fallback to the subset search

        def no_fallback(*args: object, **kwargs: object) -> bytes:
            raise AssertionError(f"a batched reconstruction failed verification: {args[0]}")

        server._reconstruct = no_fallback  # type: ignore[method-assign]
    return run_round(server, clients, make_inputs(n, 48, 1.0, seed=seed), drop_at=drop)


@pytest.mark.parametrize("n", [10, 60])
def test_server_sum_with_dropouts_batched_equals_scalar_and_plain(n: int) -> None:
    """Dropouts after key sharing make the server rebuild mask keys over several index sets
    besides the self-mask seeds; both paths must give the plain sum, bit for bit alike."""
    probe, _ = new_round(n, size=48)
    tolerated = probe.neighbourhood_size - probe.threshold
    dropped: set[int] = set()
    for cid in probe.client_ids:  # drop clients as long as every neighbourhood can afford it
        trial = dropped | {cid}
        if all(len(({o, *probe.neighbours[o]}) & trial) <= tolerated for o in probe.client_ids):
            dropped = trial
    assert len(dropped) >= 2
    drop = {str(Stage.MASKED_INPUT): dropped}
    batched, scalar = _round(True, n, drop, seed=n), _round(False, n, drop, seed=n)
    inputs = make_inputs(n, 48, 1.0, seed=n)
    kept = sorted(set(range(n)) - dropped)
    plain = np.sum([inputs[i].astype(np.float64) for i in kept], axis=0)
    for server in (batched, scalar):
        assert server.included_clients == kept and server.rejected == {}
        assert np.abs(server.result() - plain).max() < server.error_bound
    np.testing.assert_array_equal(batched.result(), scalar.result())


@pytest.mark.parametrize(("threshold", "count"), [(1, 1), (2, 3), (8, 15), (20, 29)])
def test_split_is_a_random_polynomial_of_degree_threshold_minus_one(threshold: int, count: int) -> None:
    """`split_secret` (our Horner evaluation) against pycryptodome's combine: any `threshold` shares
    give the secret, and `threshold - 1` do not (they would if a coefficient were missing); two
    splits of one secret differ (the coefficients are fresh randomness)."""
    rng = random.Random(threshold * 100 + count)
    for width in (16, 32):
        secret = rng.randbytes(width)
        shares = crypto.split_secret(secret, threshold, count)
        assert len(shares) == count and all(len(s) == width for s in shares)
        for _ in range(5):
            used = rng.sample(range(1, count + 1), threshold)
            assert crypto.combine_secret([(x, shares[x - 1]) for x in used]) == secret
            if threshold > 1:
                fewer = used[:-1]
                assert crypto.combine_secret([(x, shares[x - 1]) for x in fewer]) != secret
        if threshold > 1:
            assert crypto.split_secret(secret, threshold, count) != shares


def test_split_refuses_a_bad_width_and_a_threshold_no_set_of_shares_meets() -> None:
    """pycryptodome would split 3 shares at threshold 4; such a secret could never be rebuilt."""
    with pytest.raises(ValueError, match="16- or 32-byte"):
        crypto.split_secret(b"x" * 20, 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        crypto.split_secret(b"x" * 16, 4, 3)
