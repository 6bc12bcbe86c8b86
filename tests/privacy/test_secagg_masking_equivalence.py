"""The blockwise quantize-and-mask path gives bit for bit what the earlier whole-array path gave.

The reference functions below are the earlier code, verbatim (quantize in ~8 float64 passes over
full-length arrays, then the self mask and each pairwise mask added as full-length PRG arrays):
same input, same seed -> same uint32 vector, and the generator left in the same state.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import SecAggConfig, SecAggPlusClient, SecAggPlusServer, Stage, crypto
from privacy.secagg.crypto import PrgStream, prg_uint32
from privacy.secagg.errors import QuantizationError
from privacy.secagg.quantize import BLOCK, check_vector, levels_for, quantize, quantize_masked


def reference_quantize(
    vector: npt.NDArray[np.floating], clipping_range: float, levels: int, rng: np.random.Generator
) -> npt.NDArray[np.uint32]:
    """privacy/secagg/quantize.py's quantize before the blockwise rewrite."""
    check_vector(vector, vector.shape[0])
    c = float(clipping_range)
    scale = levels / (2.0 * c)
    scaled = np.multiply(vector, scale, dtype=np.float64)
    scaled += c * scale
    np.clip(scaled, 0.0, float(levels), out=scaled)
    low = np.floor(scaled)
    scaled -= low
    scaled *= 2.0**32
    uniform = prg_uint32(rng.bytes(16), vector.shape[0])
    out = low.astype(np.uint32)
    out += uniform < scaled
    return out


def reference_masked(
    vector: npt.NDArray[np.floating], c: float, levels: int, rng: np.random.Generator,
    add: list[bytes], subtract: list[bytes],
) -> npt.NDArray[np.uint32]:
    """The client's masked input before the rewrite: quantize, then add / subtract full-length masks."""
    masked = reference_quantize(vector, c, levels, rng)
    for seed in add:
        masked += prg_uint32(seed, vector.shape[0])
    for seed in subtract:
        masked -= prg_uint32(seed, vector.shape[0])
    return masked


SIZES = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 100_003]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_quantize_equals_the_earlier_path(size: int, dtype: type) -> None:
    data = np.random.default_rng(size)
    c = float(data.uniform(0.01, 10.0))
    x: npt.NDArray[np.floating] = (data.standard_normal(size) * c).astype(dtype)  # some values beyond [-c, c]: clipped
    x[: min(size, 3)] = [c, -c, 0.0][: min(size, 3)]  # the ends and the middle of the grid
    for n in (1, 10, 100, 10_000):
        levels = levels_for(n)
        seed = int(data.integers(2**32))
        rng_new, rng_old = np.random.default_rng(seed), np.random.default_rng(seed)
        np.testing.assert_array_equal(quantize(x, c, levels, rng_new), reference_quantize(x, c, levels, rng_old))
        assert rng_new.bytes(8) == rng_old.bytes(8)  # the same draws were taken


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=300),
    c=st.floats(min_value=1e-6, max_value=1e6),
    n=st.integers(min_value=1, max_value=2**20),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_quantize_equals_the_earlier_path_on_any_floats(values: list[float], c: float, n: int, seed: int) -> None:
    x = np.array(values, dtype=np.float32)
    levels = levels_for(n)
    np.testing.assert_array_equal(
        quantize(x, c, levels, np.random.default_rng(seed)),
        reference_quantize(x, c, levels, np.random.default_rng(seed)),
    )


def test_huge_finite_values_are_clipped_as_before() -> None:
    """Finite inputs whose scaled value overflows to infinity are clipped, not refused (as before)."""
    x = np.array([1e308, -1e308, 0.5] * BLOCK, dtype=np.float64)
    levels = levels_for(3)
    got = quantize(x, 1e-10, levels, np.random.default_rng(1))
    np.testing.assert_array_equal(got, reference_quantize(x, 1e-10, levels, np.random.default_rng(1)))


@pytest.mark.parametrize("where", [0, BLOCK - 1, BLOCK, 3 * BLOCK + 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_in_any_block_are_refused_with_the_same_message(where: int, bad: float) -> None:
    x = np.zeros(3 * BLOCK + 5, dtype=np.float32)
    x[where] = bad
    with pytest.raises(QuantizationError) as expected:
        check_vector(x, x.shape[0])
    with pytest.raises(QuantizationError) as got:
        quantize_masked(x, 1.0, 100, np.random.default_rng(0), [b"k" * 16])
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("size", [5, BLOCK + 3, 2 * BLOCK])
def test_masked_equals_the_earlier_path(size: int) -> None:
    data = np.random.default_rng(size)
    x = data.uniform(-2.0, 2.0, size).astype(np.float32)
    for adds, subs in ((1, 0), (3, 5), (8, 6)):
        add = [data.bytes(crypto.SEED_BYTES) for _ in range(adds)]
        subtract = [data.bytes(32) for _ in range(subs)]  # pairwise seeds are 32 bytes, self-mask seeds 16
        got = quantize_masked(x, 1.5, levels_for(20), np.random.default_rng(7), add, subtract)
        want = reference_masked(x, 1.5, levels_for(20), np.random.default_rng(7), add, subtract)
        np.testing.assert_array_equal(got, want)


def test_prg_stream_blocks_are_the_prg() -> None:
    seed = bytes(range(32))
    stream = PrgStream(seed)
    pieces = [stream.next_words(k).copy() for k in (1, 4, 3, BLOCK, 9)]
    np.testing.assert_array_equal(np.concatenate(pieces), prg_uint32(seed, sum(p.size for p in pieces)))


def test_client_masked_input_equals_the_earlier_path() -> None:
    """A seeded client's reply at the masked-input stage is the earlier quantize-then-mask result."""
    ids = list(range(6))
    size = BLOCK + 11
    server = SecAggPlusServer(SecAggConfig(clipping_range=0.5, neighbourhood_size=5), 3, ids, size, seed=2)
    clients = {cid: SecAggPlusClient(cid, seed=100 + cid) for cid in ids}
    outgoing = server.start()
    for _ in range(2):  # setup, share_keys
        outgoing = server.step({cid: clients[cid].handle(msg) for cid, msg in outgoing.items()})
    me = 4
    state = clients[me].state
    x = np.random.default_rng(3).uniform(-0.6, 0.6, size).astype(np.float32)
    mirror = np.random.default_rng()
    mirror.bit_generator.state = clients[me]._rng.bit_generator.state  # the draw the client is about to make
    add: list[bytes] = [state.self_mask_seed]
    subtract: list[bytes] = []
    for src in sorted(state.peers):
        pair = crypto.pair_mask_seed(state.mask_key, state.peers[src][0], 3, me, src)  # type: ignore[arg-type]
        # an AES-128 key since wire version 3: HKDF's first 16 bytes of the 256-bit key of before
        assert pair == crypto.agree(state.mask_key, state.peers[src][0], "mask", 3, me, src)[:16]  # type: ignore[arg-type]
        (add if me < src else subtract).append(pair)
    want = reference_masked(x, state.clipping_range, state.levels, mirror, add, subtract)
    reply = clients[me].handle(outgoing[me], input_vector=x)
    assert clients[me].stage == Stage.MASKED_INPUT
    np.testing.assert_array_equal(reply["masked_input"], want)
