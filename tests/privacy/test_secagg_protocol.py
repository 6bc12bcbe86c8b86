"""End-to-end SecAgg+ rounds: the unmasked sum against the plain float sum, with dropouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.secagg import SecAggAborted, SecAggConfig, SecAggPlusServer, Stage
from privacy.secagg.graph import build_graph, default_neighbourhood_size, threshold_count
from tests.privacy.test_secagg_driver import make_inputs, new_round, run_round

STAGES = [str(s) for s in Stage.ordered()]


def _plain_sum(inputs: dict[int, np.ndarray], ids: list[int]) -> np.ndarray:
    return np.sum([inputs[i].astype(np.float64) for i in ids], axis=0)


def _check(server: SecAggPlusServer, inputs: dict[int, np.ndarray], expect: set[int]) -> None:
    assert server.done
    assert server.included_clients == sorted(expect)
    err = np.abs(server.result() - _plain_sum(inputs, sorted(expect)))
    assert err.max() < server.error_bound
    assert server.rejected == {}
    # the sum always mixes at least `threshold` (>= 2) clients: never one client's input
    assert len(server.included_clients) >= server.threshold >= 2


@pytest.mark.parametrize("n", [3, 10, 50])
def test_sum_without_dropouts(n: int) -> None:
    server, clients = new_round(n)
    inputs = make_inputs(n, 64, 1.0)
    _check(run_round(server, clients, inputs), inputs, set(range(n)))


def test_extreme_inputs_never_wrap() -> None:
    """All 50 clients at +c (the largest quantized sum) and at -c: exact, no wrap-around."""
    n, c = 50, 3.0
    for value in (c, -c):
        server, clients = new_round(n, size=16, clip=c)
        inputs = {i: np.full(16, value, dtype=np.float32) for i in range(n)}
        total = run_round(server, clients, inputs).result()
        np.testing.assert_allclose(total, n * value, rtol=0, atol=1e-9)


def test_inputs_beyond_clip_range_are_clipped() -> None:
    server, clients = new_round(3, size=4, clip=1.0)
    inputs = {i: np.array([5.0, -5.0, 0.5, 1.0], dtype=np.float32) for i in range(3)}
    total = run_round(server, clients, inputs).result()
    np.testing.assert_allclose(total, [3.0, -3.0, 1.5, 3.0], atol=server.error_bound)


def _victim_and_neighbours(server: SecAggPlusServer, count: int) -> tuple[int, list[int]]:
    """A client and `count` of its neighbours (the client itself stays)."""
    victim = server.client_ids[0]
    return victim, list(server.neighbours[victim][:count])


@pytest.mark.parametrize("n", [3, 10, 50])
@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_up_to_threshold_then_abort(n: int, stage: str) -> None:
    inputs = make_inputs(n, 32, 1.0, seed=n)
    server, clients = new_round(n, size=32)
    tolerated = server.neighbourhood_size - server.threshold
    assert tolerated >= 1
    _, drop = _victim_and_neighbours(server, tolerated)
    run_round(server, clients, inputs, drop_at={stage: set(drop)})
    # clients that dropped before sending their masked input are not in the sum
    early = stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
    _check(server, inputs, set(range(n)) - (set(drop) if early else set()))

    server, clients = new_round(n, size=32)
    _, drop = _victim_and_neighbours(server, tolerated + 1)
    with pytest.raises(SecAggAborted, match="threshold") as info:
        run_round(server, clients, inputs, drop_at={stage: set(drop)})
    assert "client" in info.value.reason
    assert server.stage == "aborted" and not server.done


def test_dropouts_spread_over_every_stage() -> None:
    n = 50
    server, clients = new_round(n, size=32)
    tolerated = server.neighbourhood_size - server.threshold
    assert tolerated == 4
    _, drop = _victim_and_neighbours(server, 4)
    drop_at = {stage: {cid} for stage, cid in zip(STAGES, drop, strict=True)}
    inputs = make_inputs(n, 32, 1.0, seed=7)
    run_round(server, clients, inputs, drop_at=drop_at)
    _check(server, inputs, set(range(n)) - set(drop[:3]))


def test_scattered_dropouts_beyond_one_neighbourhood() -> None:
    """Dropouts in different neighbourhoods add up beyond a neighbourhood's tolerance."""
    n = 50
    server, clients = new_round(n, size=32)
    far_apart: list[int] = []
    for cid in server.client_ids:
        if all(cid not in server.neighbours[o] for o in far_apart):
            far_apart.append(cid)
        if len(far_apart) == 3:
            break
    inputs = make_inputs(n, 32, 1.0, seed=8)
    run_round(server, clients, inputs, drop_at={Stage.MASKED_INPUT: set(far_apart)})
    _check(server, inputs, set(range(n)) - set(far_apart))


def test_graph_is_regular_symmetric_and_logarithmic() -> None:
    import random

    for n in (10, 50, 100, 1000):
        size = default_neighbourhood_size(n)
        graph = build_graph(list(range(n)), size, random.Random(0))
        degrees = {len(v) for v in graph.values()}
        assert degrees == {min(size, n) - 1}
        assert all(a in graph[b] for a in graph for b in graph[a])
        assert size <= 2 * np.ceil(np.log2(n)) + 1
    assert threshold_count(0.66, 9) == 6
    assert threshold_count(0.51, 4) == 3  # always a strict majority


def test_config_validation() -> None:
    for bad in (
        {"clipping_range": 0.0},
        {"clipping_range": float("nan")},
        {"clipping_range": 1.0, "threshold": 0.5},
        {"clipping_range": 1.0, "threshold": 1.2},
        {"clipping_range": 1.0, "neighbourhood_size": 4},
        {"clipping_range": 1.0, "neighbourhood_size": 1},
    ):
        with pytest.raises(ValueError, match="SecAggConfig"):
            SecAggConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        SecAggPlusServer(SecAggConfig(), 1, [1, 1, 2], 8)
    with pytest.raises(ValueError, match=r"non-negative integers below 2\^63"):
        SecAggPlusServer(SecAggConfig(), 1, [-1, 1, 2], 8)


def test_explicit_neighbourhood_size() -> None:
    n = 20
    server, clients = new_round(n, size=16, neighbourhood_size=5)
    assert server.neighbourhood_size == 5 and server.threshold == 4
    inputs = make_inputs(n, 16, 1.0)
    _, drop = _victim_and_neighbours(server, 1)
    run_round(server, clients, inputs, drop_at={Stage.SHARE_KEYS: set(drop)})
    _check(server, inputs, set(range(n)) - set(drop))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(3, 14))
def test_random_dropouts_abort_exactly_when_a_neighbourhood_is_short(data: st.DataObject, n: int) -> None:
    """Each client drops at a random stage (or never); the round succeeds iff, at every
    stage, every neighbourhood whose secrets are still needed keeps `threshold` members.
    The expectation is computed here from the graph alone, independently of the server."""
    server, clients = new_round(n, size=8, round_id=data.draw(st.integers(1, 10**6)))
    stage_of = {cid: data.draw(st.sampled_from([*STAGES, None, None, None]), label=f"drop {cid}") for cid in range(n)}
    hood = {cid: {cid, *server.neighbours[cid]} for cid in range(n)}
    t = server.threshold

    def alive_after(stage: str) -> set[int]:
        upto = STAGES[: STAGES.index(stage) + 1]
        return {cid for cid in range(n) if stage_of[cid] not in upto}

    a_setup, a_keys = alive_after(Stage.SETUP), alive_after(Stage.SHARE_KEYS)
    a_input, a_unmask = alive_after(Stage.MASKED_INPUT), alive_after(Stage.UNMASK)
    ok = (
        len(a_keys) >= t  # at least one full neighbourhood must stay
        and all(len(hood[c] & a_setup) >= t for c in a_setup)
        and all(len(hood[c] & a_keys) >= t for c in a_keys)
        and all(len(hood[c] & a_input) >= t for c in a_keys)
        and all(len(hood[c] & a_unmask) >= t for c in a_keys)
    )
    inputs = make_inputs(n, 8, 1.0, seed=n)
    drop_at: dict[str, set[int]] = {}
    for cid, stage in stage_of.items():
        if stage is not None:
            drop_at.setdefault(stage, set()).add(cid)
    if ok:
        _check(run_round(server, clients, inputs, drop_at=drop_at), inputs, a_input)
    else:
        with pytest.raises(SecAggAborted):
            run_round(server, clients, inputs, drop_at=drop_at)


def test_the_same_clients_run_consecutive_rounds() -> None:
    n = 10
    _, clients = new_round(n, size=16)
    for round_id in (1, 2, 7):
        server = SecAggPlusServer(SecAggConfig(clipping_range=1.0), round_id, list(range(n)), 16)
        inputs = make_inputs(n, 16, 1.0, seed=round_id)
        _check(run_round(server, clients, inputs), inputs, set(range(n)))
    with pytest.raises(ValueError, match="2\\^63"):
        SecAggPlusServer(SecAggConfig(), 1, [0, 2**63], 8)
