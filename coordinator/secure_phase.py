"""A round's client phase under SecAgg+: the coordinator learns only the sum.

The engine drives the transport-free SecAgg+ server through the same Driver
as a plain round, one exchange per protocol stage. Training rides on the
masked-input stage: clients train, clip (and noise, under client-level DP)
their update, scale it by their weight and append the weight, then mask the
vector. After unmasking, sum / sum-of-weights is the weighted average; no
individual update is ever held, stored or logged here. Clients that drop at
any stage are tolerated while every neighbourhood keeps its threshold; below
it the round fails cleanly and the job goes on.
"""

from __future__ import annotations

import numpy as np

from coordinator.engine import (
    DECLINED,
    ERROR,
    SECAGG,
    Driver,
    RoundEngine,
    RoundFailed,
    RoundOutcome,
    client_privacy_metrics,
)
from privacy.secagg import SecAggAborted, SecAggConfig, SecAggPlusServer
from privacy.secagg.messages import read_header
from protos.codec import Message, numpy_to_tensors, unflatten_state

PREFIX = "secagg/"


def secure_client_phase(engine: RoundEngine, round_id: int, sampled: list[str], driver: Driver) -> RoundOutcome:
    settings = engine.config.privacy.secure_aggregation
    ids = {cid: i for i, cid in enumerate(sorted(sampled))}
    names = {i: cid for cid, i in ids.items()}
    train = engine.train_message(round_id, len(sampled))
    template = train.tensors
    vector_size = sum(t.numel() for t in template.values()) + 1  # + the weight
    try:
        server = SecAggPlusServer(SecAggConfig(clipping_range=settings.clipping_range, threshold=settings.threshold),
                                  round_id, list(ids.values()), vector_size)
        outgoing = server.start()
    except ValueError as exc:
        raise RoundFailed(f"secure aggregation cannot start: {exc}") from exc
    reports: dict[str, dict] = {}
    while not server.done:
        messages: dict[str, Message] = {}
        for i, payload in outgoing.items():
            _, stage, _, _ = read_header(payload, "server message")
            config = {"secagg_id": i, "secagg_stage": stage, "secagg_weight_cap": settings.weight_cap}
            tensors = numpy_to_tensors({PREFIX + k: v for k, v in payload.items()})
            if stage == "masked_input":
                config.update(train.config)
                tensors.update(template)
            messages[names[i]] = Message(round_id, SECAGG, config, tensors)
        result = engine.exchange(driver, round_id, messages)
        replies = {}
        for cid, reply in result.replies.items():
            if reply.stage in (DECLINED, ERROR) or reply.stage != SECAGG:
                engine.round_stats["failures"][cid] = f"{reply.stage}: {reply.config.get('reason', '')}"
                reports[cid] = reply.config
                continue
            if reply.config:
                reports[cid] = reply.config
            replies[ids[cid]] = {k[len(PREFIX):]: v.numpy() for k, v in reply.tensors.items() if k.startswith(PREFIX)}
        try:
            outgoing = server.step(replies)
        except SecAggAborted as exc:
            raise RoundFailed(f"secure aggregation aborted: {exc}") from exc
        for i, reason in server.rejected.items():
            engine.round_stats["failures"].setdefault(names[i], f"secure aggregation rejected: {reason}")
    total = server.result()
    completed = [names[i] for i in server.included_clients]
    weight_sum = float(total[-1])
    if not weight_sum > 0:
        raise RoundFailed("secure aggregation summed to zero weight")
    delta = unflatten_state((total[:-1] / weight_sum).astype(np.float32), template)
    losses = [(float(reports[c].get("secagg_weight", 1.0)), float(reports[c].get("train_loss", float("nan"))))
              for c in completed if c in reports]
    loss = sum(w * x for w, x in losses) / max(sum(w for w, _ in losses), 1e-12) if losses else None
    extra = client_privacy_metrics(engine, reports)
    extra["secagg_error_bound"] = server.error_bound / weight_sum
    return RoundOutcome(delta=delta, completed=completed, train_loss=loss, extra=extra)
