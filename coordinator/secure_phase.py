"""A round's client phase under SecAgg+: the coordinator learns only the sum.

The engine drives the transport-free SecAgg+ server through the same Driver
as a plain round, one exchange per protocol stage. Training rides on the
masked-input stage: clients train, clip (and noise, under client-level DP)
their update, scale it by their weight w in [0, 1] and append w x c (c the
quantizer's range, so the weight stays on the grid), then mask the vector;
each declares w in the clear. After unmasking, the sum is divided by the
declared weights, and the round is refused when the securely summed weights
disagree with them: no client can give itself weight 8, or a negative weight
that shrinks the divisor. No individual update is ever held, stored or logged
here. Clients that drop at any stage are tolerated while every neighbourhood
keeps its threshold; below it the round fails cleanly and the job goes on.

Clients send the public keys of their next round with their unmask replies;
the engine keeps them (``secagg_prekeys``, memory only) and a later round that
samples such a client skips its setup message (privacy/secagg/prekeys.py). A
round whose clients all came with keys is three exchanges instead of four.
Keys serve once: a round takes its sampled clients' keys off the list whether
it completes or not.
"""

from __future__ import annotations

import numpy as np

from coordinator.bounds import secure_clipping_range
from coordinator.rounds import Driver, RoundContext, RoundFailed, RoundOutcome, client_privacy_metrics
from privacy.secagg import SecAggAborted, SecAggConfig, SecAggPlusServer
from privacy.secagg.messages import read_header
from protos.codec import Message, numpy_to_tensors, unflatten_state
from protos.wire import ClientReport, SecAggInstruction, Stage

PREFIX = "secagg/"
MASKED_INPUT = "masked_input"


def secure_client_phase(engine: RoundContext, round_id: int, sampled: list[str], driver: Driver) -> RoundOutcome:
    """A round's client phase under SecAgg+: one exchange per protocol stage, training inside the masked-input
    stage, and only the unmasked sum comes out; a stage that loses too many clients fails the round.
    """
    settings = engine.config.privacy.secure_aggregation
    ids = {cid: i for i, cid in enumerate(sorted(sampled))}
    names = {i: cid for cid, i in ids.items()}
    train = engine.train_message(round_id, len(sampled))
    instruction = engine.train_instruction(len(sampled))
    template = train.tensors
    vector_size = sum(t.numel() for t in template.values()) + 1  # + the weight
    clipping_range = secure_clipping_range(engine.config, template, len(sampled))
    try:
        server = SecAggPlusServer(SecAggConfig(clipping_range=clipping_range, threshold=settings.threshold),
                                  round_id, list(ids.values()), vector_size)
        prekeys = {i: engine.secagg_prekeys.pop(cid) for cid, i in ids.items() if cid in engine.secagg_prekeys}
        outgoing = server.start(prekeys)
    except (ValueError, SecAggAborted) as exc:
        raise RoundFailed(f"secure aggregation cannot start: {exc}") from exc
    reports: dict[str, ClientReport] = {}  # every stage's report (the train report comes with the masked input)
    inputs: dict[str, ClientReport] = {}  # reports that came with a masked input
    while not server.done:
        messages: dict[str, Message] = {}
        stage = ""
        for i, payload in outgoing.items():
            _, stage, _, _ = read_header(payload, "server message")
            tensors = numpy_to_tensors({PREFIX + k: v for k, v in payload.items()})
            if stage == MASKED_INPUT:
                tensors.update(template)
            config = SecAggInstruction(client_index=i, secagg_stage=stage, weight_cap=settings.weight_cap,
                                       train=instruction if stage == MASKED_INPUT else None).to_config()
            messages[names[i]] = Message(round_id, Stage.SECAGG, config, tensors)
        result = engine.exchange(driver, round_id, messages)
        replies = {}
        for cid, reply in result.replies.items():
            report = result.reports[cid]
            if reply.stage != Stage.SECAGG:  # declined, failed, or answered something else
                engine.round_stats.failures[cid] = f"{reply.stage}: {report.reason}"
                reports[cid] = report
                continue
            if stage == MASKED_INPUT:
                if report.secagg_weight is None:  # its input could not be normalised: leave it out of the sum
                    engine.reject(cid, "masked input without its declared secagg_weight")
                    continue
                inputs[cid] = reports[cid] = report
            replies[ids[cid]] = {k[len(PREFIX):]: v.numpy() for k, v in reply.tensors.items() if k.startswith(PREFIX)}
        try:
            outgoing = server.step(replies)
        except SecAggAborted as exc:
            raise RoundFailed(f"secure aggregation aborted: {exc}") from exc
        finally:  # keys offered with unmask replies are fresh and unused whatever became of this round's sum
            engine.secagg_prekeys.update({names[i]: keys for i, keys in server.next_keys.items()})
        for i, reason in server.rejected.items():
            if names[i] not in engine.round_stats.rejected:
                engine.reject(names[i], f"secure aggregation: {reason}")
    total = server.result()
    completed = [names[i] for i in server.included_clients]
    declared = sum(inputs[c].secagg_weight or 0.0 for c in completed)
    summed = float(total[-1]) / clipping_range
    tolerance = server.error_bound / clipping_range + 1e-6 * len(completed)
    if abs(summed - declared) > tolerance:
        raise RoundFailed(
            f"secure aggregation: the weights inside the secure sum ({summed:.6g}) differ from the weights the "
            f"{len(completed)} clients declared ({declared:.6g}): a client misreported its weight; round refused")
    if not declared > 0:
        raise RoundFailed("secure aggregation summed to zero weight")
    delta = unflatten_state((total[:-1] / declared).astype(np.float32), template)
    losses = [(inputs[c].secagg_weight or 0.0, inputs[c].train_loss) for c in completed]
    known = [(w, x) for w, x in losses if x is not None]
    loss = sum(w * x for w, x in known) / max(sum(w for w, _ in known), 1e-12) if known else None
    extra = client_privacy_metrics(engine, reports)
    extra["secagg_error_bound"] = server.error_bound / declared
    extra["secagg_clipping_range"] = clipping_range
    extra["secagg_keyed_clients"] = len(server.keyed)  # set up with keys made ahead: no setup message
    return RoundOutcome(delta=delta, completed=completed, train_loss=loss, extra=extra)
