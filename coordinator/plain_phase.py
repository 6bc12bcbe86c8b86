"""A plain round's client phase: every sampled client trains, the coordinator averages what comes back."""

from __future__ import annotations

import hashlib
from collections import Counter

import torch

from coordinator.bounds import plain_update_bound
from coordinator.rounds import Driver, RoundContext, RoundFailed, RoundOutcome, client_privacy_metrics
from coordinator.strategy import State, UpdateRejected, check_update, robust_mean, weighted_mean
from protos.wire import Stage


def plain_client_phase(engine: RoundContext, round_id: int, sampled: list[str], driver: Driver) -> RoundOutcome:
    """Send the global tensors, average the deltas that come back weighted by examples
    (uniformly under client-level DP, where each client's influence must be bounded).

    Each update must pass :func:`check_update` and stay within this round's norm bound
    (:func:`coordinator.bounds.plain_update_bound`); a client's weight is its example count, capped at
    ``[server] examples_cap``. Refused replies are named in the round's ``reject_reasons``.
    """
    message = engine.train_message(round_id, len(sampled))
    messages = {cid: message for cid in sampled}
    expected = message.tensors
    bound = plain_update_bound(engine.config, expected, len(sampled))
    cap = engine.config.server.examples_cap
    result = engine.exchange(driver, round_id, messages)
    updates: list[State] = []
    weights: list[float] = []
    losses: list[float | None] = []
    completed: list[str] = []
    capped: list[str] = []
    for cid, reply in sorted(result.replies.items()):
        report = result.reports[cid]
        if reply.stage in (Stage.DECLINED, Stage.ERROR):
            engine.round_stats.failures[cid] = f"{reply.stage}: {report.reason or 'no reason given'}"
            continue
        try:
            if reply.stage != Stage.TRAIN or reply.round != round_id:
                raise UpdateRejected(f"reply for round {reply.round} stage {reply.stage!r}")
            norm = check_update(reply.tensors, expected)
            if norm > bound:
                raise UpdateRejected(f"update norm {norm:.4g} exceeds this round's bound {bound:.4g}")
            if report.num_examples is None:
                raise UpdateRejected("num_examples is missing")
        except UpdateRejected as exc:
            engine.reject(cid, str(exc))
            continue
        weight = float(min(report.num_examples, cap))
        if report.num_examples > cap:
            capped.append(cid)
        if engine.config.privacy.client_dp.enabled:
            weight = 1.0
        updates.append(reply.tensors)
        weights.append(weight)
        losses.append(report.train_loss)
        completed.append(cid)
    if len(updates) < engine.config.job.min_clients:
        raise RoundFailed(
            f"{len(updates)} of {len(sampled)} clients completed, min_clients is {engine.config.job.min_clients}"
        )
    order = aggregation_order(updates, weights)
    updates, weights, losses = [updates[i] for i in order], [weights[i] for i in order], [losses[i] for i in order]
    aggregator = engine.config.server.aggregator
    if aggregator == "mean":
        delta = weighted_mean(updates, weights)
    else:
        delta = robust_mean(updates, aggregator, engine.config.server.trim_fraction)
    known = [(w, x) for w, x in zip(weights, losses, strict=True) if x is not None]
    loss = sum(w * x for w, x in known) / sum(w for w, _ in known) if known else None
    extra = client_privacy_metrics(engine, {cid: result.reports[cid] for cid in result.replies})
    extra["update_norm_bound"] = bound
    if capped:
        extra["examples_capped"] = sorted(capped)
    return RoundOutcome(delta=delta, completed=completed, train_loss=loss, extra=extra)


def aggregation_order(updates: list[State], weights: list[float]) -> list[int]:
    """The order to sum updates in, fixed by their weights and content, not by client ids, so that drivers that
    name clients differently (gRPC, Flower) aggregate bit for bit the same way.

    By weight, then by the first bytes of the update, then by a digest of all its bytes; the digest is computed
    only for updates that share weight and first bytes with another (identical updates), since it orders nothing
    else.
    """
    heads = [_head(u) for u in updates]
    shared = {key for key, n in Counter(zip(weights, heads, strict=True)).items() if n > 1}
    return sorted(range(len(updates)), key=lambda i: (
        weights[i], heads[i], _digest(updates[i]) if (weights[i], heads[i]) in shared else ""))


def _raw(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().contiguous().numpy().data.cast("B")


def _head(state: State, size: int = 256) -> bytes:
    """The first ``size`` bytes of the first tensor by name (an update's first values, as stored)."""
    return bytes(_raw(state[min(state)])[:size]) if state else b""


def _digest(state: State) -> str:
    """SHA-256 of the tensors' raw memory in name order (what ``tobytes`` would copy, hashed in place)."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(_raw(state[name]))
    return hasher.hexdigest()
