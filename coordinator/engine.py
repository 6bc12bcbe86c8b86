"""The round engine: written once, driven by the gRPC servicer and by Flower's simulation.

It knows rounds, sampling, quorum, aggregation, evaluation, checkpoints and
metrics, and nothing about transport: a :class:`Driver` delivers messages to
clients and brings back whatever replies arrive before the deadline. A client
that does not answer is a dropout; a round with fewer than ``min_clients``
good updates fails cleanly, the global model stays as it was, and the job
goes on with the next round.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from coordinator.bounds import plain_update_bound
from coordinator.checkpoint import Checkpoint, Checkpointer
from coordinator.config import JobConfig
from coordinator.metrics import MetricsLog
from coordinator.replies import ClientReport, ReplyRejected, read_report
from coordinator.strategy import (
    ServerOptimizer,
    State,
    UpdateRejected,
    check_update,
    make_server_optimizer,
    robust_mean,
    update_norm,
    weighted_mean,
)
from protos.codec import Message

log = logging.getLogger("fedsite.engine")

TRAIN = "train"
_FROM_DRIVER = "_fedsite_from_driver"  # marks exceptions raised by Driver.exchange (see RoundEngine._client_phase)
SECAGG = "secagg"
DECLINED = "declined"
ERROR = "error"


@dataclass
class Exchange:
    """What came back from one send-and-collect."""

    replies: dict[str, Message]
    failures: dict[str, str] = field(default_factory=dict)  # client -> why no reply
    bytes_down: int = 0
    bytes_up: int = 0
    # client -> its reply's checked report (RoundEngine.exchange fills it; replies that fail the check are removed)
    reports: dict[str, ClientReport] = field(default_factory=dict)


class Driver(Protocol):
    """Transport: the only thing the gRPC coordinator and the Flower ServerApp implement."""

    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        """Block until at least ``count`` clients are available (or timeout); return them all."""
        ...

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        """Send each client its message; collect replies until all answered, died, or timeout."""
        ...


class GlobalModel(Protocol):
    """The coordinator's model, seen through its trainable tensors."""

    def trainable_state(self) -> State: ...

    def set_trainable_state(self, state: State) -> None: ...

    def evaluate(self) -> dict[str, float]: ...


class RoundFailed(RuntimeError):
    """A round that produced no update (too few clients, or secure aggregation aborted)."""


@dataclass
class RoundOutcome:
    """Aggregated result of a round's client phase (plain or secure)."""

    delta: State
    completed: list[str]
    train_loss: float | None
    extra: dict[str, Any] = field(default_factory=dict)


# The client phase of a round: (engine, round, sampled clients, driver) -> outcome.
ClientPhase = Callable[["RoundEngine", int, list[str], Driver], RoundOutcome]


class RoundEngine:
    def __init__(
        self,
        config: JobConfig,
        model: GlobalModel,
        checkpointer: Checkpointer,
        metrics: MetricsLog,
        *,
        client_phase: ClientPhase | None = None,
        round_hooks: list[Callable[[int, dict[str, Any]], None]] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.optimizer: ServerOptimizer = make_server_optimizer(
            config.server.optimizer,
            lr=config.server.lr,
            beta1=config.server.beta1,
            beta2=config.server.beta2,
            eps=config.server.eps,
        )
        if client_phase is None:
            from coordinator.secure_phase import secure_client_phase

            secure = config.privacy.secure_aggregation.enabled
            client_phase = secure_client_phase if secure else plain_client_phase
        self.client_phase: ClientPhase = client_phase
        self.privacy = JobPrivacy(config, checkpointer.folder.parent / "privacy-job.json")
        self.round_hooks = round_hooks or []
        self.completed_rounds = 0
        self.round_stats: dict[str, Any] = {}
        self.client_epsilon: dict[str, float] = {}  # latest ε each client reported (sample-level DP)
        # what the engine is doing now, for watchers that must not block it (the dashboard reads these two
        # plain attributes from another thread; only the engine writes them)
        self.current_round = 0
        self.stage = "starting"

    # -- lifecycle -------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the newest checkpoint if any; return the last completed round (0 = fresh)."""
        checkpoint = self.checkpointer.latest()
        if checkpoint is None:
            return 0
        self.model.set_trainable_state(checkpoint.global_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.completed_rounds = checkpoint.round
        self.metrics.truncate_after(checkpoint.round)
        for record in self.metrics.read():
            self.client_epsilon.update(record.get("epsilon_local") or {})
        log.info("resumed after round %d from %s", checkpoint.round, self.checkpointer.folder)
        return checkpoint.round

    def run(self, driver: Driver, *, evaluate_first: bool = True) -> list[dict[str, Any]]:
        """Run the remaining rounds; returns the metrics records written."""
        records: list[dict[str, Any]] = []
        if self.completed_rounds == 0 and evaluate_first:
            records.append(self._record_round_zero())
        for round_id in range(self.completed_rounds + 1, self.config.job.rounds + 1):
            records.append(self.run_round(round_id, driver))
        self.stage = "done"
        return records

    def _record_round_zero(self) -> dict[str, Any]:
        start = time.monotonic()
        self.current_round, self.stage = 0, "evaluating"
        record: dict[str, Any] = {"round": 0, "sampled_clients": 0, "completed_clients": 0,
                                  "dropped_clients": 0, "bytes_down": 0, "bytes_up": 0}
        record.update(self.model.evaluate())
        record["seconds"] = time.monotonic() - start
        self.metrics.append(record)
        self._announce(0, record)
        return record

    # -- one round -------------------------------------------------------------------------

    def sample(self, round_id: int, available: list[str]) -> list[str]:
        """Seeded by (job seed, round) so a resumed or simulated run samples the same clients."""
        rng = random.Random(f"{self.config.job.seed}:{round_id}")
        pool = sorted(available)
        return sorted(rng.sample(pool, min(self.config.job.clients_per_round, len(pool))))

    def train_message(self, round_id: int, num_sampled: int) -> Message:
        """The instruction every sampled client gets: global tensors plus this round's settings."""
        train = self.config.train
        config: dict[str, Any] = {
            "local_steps": train.local_steps,
            "batch_size": train.batch_size,
            "physical_batch_size": train.physical_batch_size,
            "cache_frozen_prefix": train.cache_frozen_prefix,
            "lr": train.lr,
            "weight_decay": train.weight_decay,
            "head_lr": train.head_lr,
            "seed": self.config.job.seed,
        }
        local_dp = self.config.privacy.local_dp
        if local_dp.enabled:
            config["local_dp"] = {"delta": local_dp.delta, "max_grad_norm": local_dp.max_grad_norm,
                                  "head_clip_fraction": local_dp.head_clip_fraction,
                                  "max_epsilon": local_dp.budget, "accountant": local_dp.accountant,
                                  # a calibrating client plans for taking part in every round left
                                  "rounds": self.config.job.rounds}
            if local_dp.target_epsilon is not None:
                config["local_dp"]["target_epsilon"] = local_dp.target_epsilon
            else:
                config["local_dp"]["noise_multiplier"] = local_dp.noise_multiplier
        client_dp = self.config.privacy.client_dp
        if client_dp.enabled:
            config["client_dp"] = {"clip_norm": client_dp.clip_norm, "noise_multiplier": client_dp.noise_multiplier,
                                   "distributed": client_dp.distributed, "num_clients": num_sampled}
        return Message(round=round_id, stage=TRAIN, config=config, tensors=self.model.trainable_state())

    def run_round(self, round_id: int, driver: Driver) -> dict[str, Any]:
        job = self.config.job
        start = time.monotonic()
        self.current_round, self.stage = round_id, "waiting for clients"
        available = driver.wait_for_clients(job.min_clients, job.wait_for_clients_s)
        if len(available) < job.clients_per_round:  # a quorum is here; give the rest a moment
            available = driver.wait_for_clients(job.clients_per_round, job.sample_grace_s)
        sampled = self.sample(round_id, available)
        self.round_stats = {"bytes_down": 0, "bytes_up": 0, "failures": {}, "rejected": {}}
        record: dict[str, Any] = {"round": round_id, "sampled_clients": len(sampled),
                                  "sampled_client_ids": sampled, "completed_client_ids": []}
        try:
            if len(sampled) < job.min_clients:
                raise RoundFailed(f"only {len(sampled)} clients available, min_clients is {job.min_clients}")
            outcome = self._client_phase(round_id, sampled, driver)
            agg_start = time.monotonic()
            self.stage = "aggregating"
            outcome.delta = self.privacy.finish_aggregate(outcome, len(sampled), len(available), record)
            new_state = self.optimizer.step(self.model.trainable_state(), outcome.delta)
            self.model.set_trainable_state(new_state)
            record["seconds_aggregate"] = time.monotonic() - agg_start
            record["completed_clients"] = len(outcome.completed)
            record["completed_client_ids"] = sorted(outcome.completed)
            record["train_loss"] = outcome.train_loss
            record.update(outcome.extra)
            record["status"] = "ok"
        except RoundFailed as exc:
            log.warning("round %d failed: %s", round_id, exc)
            record["completed_clients"] = 0
            record["status"] = "failed"
            record["failure"] = str(exc)
        failures: dict[str, str] = self.round_stats["failures"]
        record["dropped_clients"] = len(failures)
        if failures:
            record["drop_reasons"] = dict(sorted(failures.items()))
        rejected: dict[str, str] = self.round_stats["rejected"]
        record["rejected_clients"] = len(rejected)
        if rejected:
            record["reject_reasons"] = dict(sorted(rejected.items()))
        for key in ("bytes_down", "bytes_up", "seconds_exchange", "seconds_train_max"):
            if key in self.round_stats:
                record[key] = self.round_stats[key]
        eval_start = time.monotonic()
        self.stage = "evaluating"
        record.update(self.model.evaluate())
        record["seconds_eval"] = time.monotonic() - eval_start
        for hook in self.round_hooks:
            hook(round_id, record)
        self.stage = "checkpointing"
        self.checkpointer.save(
            Checkpoint(round=round_id, global_state=self.model.trainable_state(),
                       optimizer_state=self.optimizer.state_dict(), info={"status": record["status"]})
        )
        self.completed_rounds = round_id
        record["seconds"] = time.monotonic() - start
        self.metrics.append(record)
        self._announce(round_id, record)
        return record

    def _announce(self, round_id: int, record: dict[str, Any]) -> None:
        metric = next((k for k in ("val_accuracy", "val_perplexity") if k in record), None)
        shown = f"{metric}={record[metric]:.4f}" if metric else ""
        log.info(
            "round %d/%d %s: %d/%d clients completed, %s, %.1fs",
            round_id, self.config.job.rounds, record.get("status", "baseline"),
            record.get("completed_clients", 0), record.get("sampled_clients", 0), shown,
            record.get("seconds", 0.0),
        )

    def _client_phase(self, round_id: int, sampled: list[str], driver: Driver) -> RoundOutcome:
        """The client phase, with a last line of defence: whatever it raises fails this round, not the job.

        Every reply is checked before use (:mod:`coordinator.replies`); an exception that still escapes is a bug,
        logged with its traceback, and the job goes on with the global model unchanged.
        """
        try:
            return self.client_phase(self, round_id, sampled, driver)
        except RoundFailed:
            raise
        except Exception as exc:
            if getattr(exc, _FROM_DRIVER, False):  # the transport itself failed: that ends the job, as before
                raise
            log.exception("round %d: internal error in the client phase", round_id)
            raise RoundFailed(f"internal error: {type(exc).__name__}: {str(exc)[:200]}") from exc

    # -- helpers for client phases ---------------------------------------------------------

    def reject(self, client_id: str, reason: str) -> None:
        """A client's reply refused this round: counted as dropped, and named in ``reject_reasons``."""
        log.warning("round %d: reply of %s rejected: %s", self.current_round, client_id, reason)
        self.round_stats["failures"][client_id] = f"rejected: {reason}"
        self.round_stats["rejected"][client_id] = reason

    def exchange(self, driver: Driver, round_id: int, messages: dict[str, Message]) -> Exchange:
        """driver.exchange plus the round's byte, time and failure bookkeeping."""
        start = time.monotonic()
        first = next(iter(messages.values()), None)
        if first is not None:  # "train", or the SecAgg+ stage ("masked_input" is where clients train)
            self.stage = str(first.config.get("secagg_stage", first.stage))
        try:
            result = driver.exchange(round_id, messages, self.config.job.round_timeout_s)
        except Exception as exc:
            with contextlib.suppress(AttributeError):
                setattr(exc, _FROM_DRIVER, True)
            raise
        self.round_stats["seconds_exchange"] = self.round_stats.get("seconds_exchange", 0.0) + time.monotonic() - start
        self.round_stats["bytes_down"] += result.bytes_down
        self.round_stats["bytes_up"] += result.bytes_up
        self.round_stats["failures"].update(result.failures)
        for cid, reply in sorted(result.replies.items()):
            try:
                result.reports[cid] = read_report(reply.config)
            except ReplyRejected as exc:
                del result.replies[cid]
                self.reject(cid, str(exc))
        train_times = [r.seconds_train for r in result.reports.values() if r.seconds_train is not None]
        if train_times:
            self.round_stats["seconds_train_max"] = max(self.round_stats.get("seconds_train_max", 0.0), *train_times)
        return result


def plain_client_phase(engine: RoundEngine, round_id: int, sampled: list[str], driver: Driver) -> RoundOutcome:
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
        if reply.stage in (DECLINED, ERROR):
            engine.round_stats["failures"][cid] = f"{reply.stage}: {report.reason or 'no reason given'}"
            continue
        try:
            if reply.stage != TRAIN or reply.round != round_id:
                raise UpdateRejected(f"reply for round {reply.round} stage {reply.stage!r}")
            check_update(reply.tensors, expected)
            norm = update_norm(reply.tensors)
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
    # sum in an order fixed by the updates' content, not by client ids, so that drivers that
    # name clients differently (gRPC, Flower) aggregate bit for bit the same way
    order = sorted(range(len(updates)), key=lambda i: (weights[i], _digest(updates[i])))
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


def client_privacy_metrics(engine: RoundEngine, reports: dict[str, ClientReport]) -> dict[str, Any]:
    """ε the clients report after the round (sample-level DP), as the design card names them.

    ``epsilon_local`` is what this round's clients have spent so far; ``epsilon_local_max`` is
    the largest ε any client of the job has reported, so it never decreases from round to round.
    """
    config = engine.config
    if not config.privacy.local_dp.enabled:
        return {}
    spent = {cid: r.epsilon for cid, r in reports.items() if r.epsilon is not None}
    engine.client_epsilon.update(spent)
    out: dict[str, Any] = {"epsilon_local": dict(sorted(spent.items())), "delta_local": config.privacy.local_dp.delta}
    sigmas = {cid: r.noise_multiplier for cid, r in reports.items() if r.noise_multiplier is not None}
    if sigmas:
        out["noise_multiplier_local"] = dict(sorted(sigmas.items()))
    if engine.client_epsilon:
        out["epsilon_local_max"] = max(engine.client_epsilon.values())
    declined = sorted(cid for cid, r in reports.items() if "privacy budget" in r.reason)
    if declined:
        out["budget_exhausted_clients"] = declined
    return out


class JobPrivacy:
    """Client-level DP on the coordinator: the noise it adds (central mode) and the job's ε."""

    def __init__(self, config: JobConfig, ledger_path: Any) -> None:
        from privacy.accounting import PrivacyLedger

        self.config = config.privacy.client_dp
        self.ledger = PrivacyLedger(ledger_path if self.config.enabled else None)

    def finish_aggregate(self, outcome: RoundOutcome, sampled: int, enrolled: int,
                         record: dict[str, Any]) -> State:
        if not self.config.enabled:
            return outcome.delta
        from privacy.client_dp import central_noise, effective_noise_multiplier

        completed = len(outcome.completed)
        delta = outcome.delta
        sigma = self.config.noise_multiplier
        if self.config.distributed:
            sigma = effective_noise_multiplier(sigma, num_clients=sampled, completed_clients=completed)
        else:
            # the mean of m clipped updates; noise of std sigma*S on the sum is sigma*S/m on the mean
            summed = {k: v * completed for k, v in delta.items()}
            seed = int.from_bytes(os.urandom(8), "little")
            noised = central_noise(summed, clip_norm=self.config.clip_norm, noise_multiplier=sigma,
                                   generator=torch.Generator().manual_seed(seed))
            delta = {k: v / completed for k, v in noised.items()}
        self.ledger.record(noise_multiplier=sigma, sample_rate=min(1.0, sampled / max(enrolled, 1)), steps=1)
        record["epsilon_client"] = self.ledger.epsilon(self.config.delta)
        record["delta_client"] = self.config.delta
        record["noise_multiplier_effective"] = sigma
        return delta


def _digest(state: State) -> str:
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(state[name].numpy().tobytes())
    return hasher.hexdigest()
