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
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from coordinator.checkpoint import Checkpoint, Checkpointer
from coordinator.config import JobConfig
from coordinator.job_privacy import JobPrivacy
from coordinator.metrics import MetricsLog, clean_record
from coordinator.plain_phase import plain_client_phase
from coordinator.rounds import (  # the engine's vocabulary, importable from here as before
    ClientPhase,
    Driver,
    Exchange,
    GlobalModel,
    RoundFailed,
    RoundOutcome,
    RoundStats,
)
from coordinator.secure_phase import secure_client_phase
from coordinator.strategy import ServerOptimizer, make_server_optimizer
from protos.codec import Message
from protos.wire import ClientDPInstruction, LocalDPInstruction, ReplyRejected, Stage, TrainInstruction, read_report

__all__ = ["ClientPhase", "Driver", "Exchange", "GlobalModel", "RoundEngine", "RoundFailed", "RoundOutcome",
           "RoundStats"]

log = logging.getLogger("fedsite.engine")

_FROM_DRIVER = "_fedsite_from_driver"  # marks exceptions raised by Driver.exchange (see RoundEngine._client_phase)


class RoundEngine:
    """Runs a job's rounds against any :class:`Driver`: sample, client phase, aggregate, evaluate, checkpoint.

    Written once for both drivers (gRPC mailbox, Flower), so the two give the same rounds;
    the client phase (plain or secure) is chosen once, at construction.
    """
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
        if client_phase is None:  # chosen once, for the whole job
            secure = config.privacy.secure_aggregation.enabled
            client_phase = secure_client_phase if secure else plain_client_phase
        self.client_phase: ClientPhase = client_phase
        self.privacy = JobPrivacy(config, checkpointer.folder.parent / "privacy-job.json")
        self.round_hooks = round_hooks or []
        self.completed_rounds = 0
        self.round_stats = RoundStats()
        self.client_epsilon: dict[str, float] = {}  # latest ε each client reported (sample-level DP)
        self.secagg_prekeys: dict[str, tuple[bytes, bytes]] = {}  # see RoundContext
        # what the engine is doing now, for watchers that must not block it (the dashboard reads these two
        # plain attributes from another thread; only the engine writes them). Not a wire Stage: while it
        # exchanges, the activity is named after the stage it sends, otherwise "aggregating", "evaluating"...
        self.current_round = 0
        self.activity = "starting"

    # -- lifecycle -------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the newest checkpoint if any; return the last completed round (0 = fresh)."""
        checkpoint = self.checkpointer.latest()
        if checkpoint is None:  # killed before round 1 was saved: start again, round 0's record included
            self.metrics.truncate_after(-1)
            return 0
        self.model.set_trainable_state(checkpoint.global_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.completed_rounds = checkpoint.round
        self.metrics.truncate_after(checkpoint.round)
        saved_record = checkpoint.info.get("record")
        if saved_record and not any(r.get("round") == checkpoint.round for r in self.metrics.read()):
            # killed between the checkpoint and the metrics append: the checkpoint carries the record
            self.metrics.append(saved_record)
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
        self.activity = "done"
        return records

    def _record_round_zero(self) -> dict[str, Any]:
        start = time.monotonic()
        self.current_round, self.activity = 0, "evaluating"
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
        return Message(round=round_id, stage=Stage.TRAIN, config=self.train_instruction(num_sampled).to_config(),
                       tensors=self.model.trainable_state())

    def train_instruction(self, num_sampled: int) -> TrainInstruction:
        """This round's training settings for the ``num_sampled`` clients sampled (the job's, plus the privacy)."""
        train, job = self.config.train, self.config.job
        local_dp = self.config.privacy.local_dp
        client_dp = self.config.privacy.client_dp
        return TrainInstruction(
            local_steps=train.local_steps, batch_size=train.batch_size,
            physical_batch_size=train.physical_batch_size, cache_frozen_prefix=train.cache_frozen_prefix,
            lr=train.lr, weight_decay=train.weight_decay, head_lr=train.head_lr, seed=job.seed,
            local_dp=LocalDPInstruction(
                delta=local_dp.delta, max_grad_norm=local_dp.max_grad_norm,
                head_clip_fraction=local_dp.head_clip_fraction, max_epsilon=local_dp.budget,
                accountant=local_dp.accountant, rounds=job.rounds, target_epsilon=local_dp.target_epsilon,
                noise_multiplier=local_dp.noise_multiplier if local_dp.target_epsilon is None else None,
            ) if local_dp.enabled else None,
            client_dp=ClientDPInstruction(
                clip_norm=client_dp.clip_norm, noise_multiplier=client_dp.noise_multiplier,
                distributed=client_dp.distributed, num_clients=num_sampled,
            ) if client_dp.enabled else None,
        )

    def run_round(self, round_id: int, driver: Driver) -> dict[str, Any]:
        """One round from sampling to checkpoint; returns its metrics record.

        A round that cannot finish (too few clients, SecAgg+ aborted) is recorded as failed and the
        model keeps its weights: the job goes on with the next round.
        """
        job = self.config.job
        start = time.monotonic()
        self.current_round, self.activity = round_id, "waiting for clients"
        available = driver.wait_for_clients(job.min_clients, job.wait_for_clients_s)
        if len(available) < job.clients_per_round:  # a quorum is here; give the rest a moment
            available = driver.wait_for_clients(job.clients_per_round, job.sample_grace_s)
        sampled = self.sample(round_id, available)
        self.round_stats = RoundStats()
        record: dict[str, Any] = {"round": round_id, "sampled_clients": len(sampled),
                                  "sampled_client_ids": sampled, "completed_client_ids": []}
        try:
            if len(sampled) < job.min_clients:
                raise RoundFailed(f"only {len(sampled)} clients available, min_clients is {job.min_clients}")
            outcome = self._client_phase(round_id, sampled, driver)
            agg_start = time.monotonic()
            self.activity = "aggregating"
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
        stats = self.round_stats
        record["dropped_clients"] = len(stats.failures)
        if stats.failures:
            record["drop_reasons"] = dict(sorted(stats.failures.items()))
        record["rejected_clients"] = len(stats.rejected)
        if stats.rejected:
            record["reject_reasons"] = dict(sorted(stats.rejected.items()))
        record.update(stats.record_fields())
        eval_start = time.monotonic()
        self.activity = "evaluating"
        record.update(self.model.evaluate())
        record["seconds_eval"] = time.monotonic() - eval_start
        for hook in self.round_hooks:
            hook(round_id, record)
        self.activity = "checkpointing"
        record["seconds"] = time.monotonic() - start
        # the record rides in the checkpoint, so a crash before the append below loses nothing
        self.checkpointer.save(
            Checkpoint(round=round_id, global_state=self.model.trainable_state(),
                       optimizer_state=self.optimizer.state_dict(),
                       info={"status": record["status"], "record": clean_record(record)})
        )
        self.completed_rounds = round_id
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
        self.round_stats.failures[client_id] = f"rejected: {reason}"
        self.round_stats.rejected[client_id] = reason

    def exchange(self, driver: Driver, round_id: int, messages: dict[str, Message]) -> Exchange:
        """driver.exchange plus the round's byte, time and failure bookkeeping."""
        start = time.monotonic()
        first = next(iter(messages.values()), None)
        if first is not None:  # the wire stage it exchanges: "train", or a SecAgg+ stage ("masked_input" trains)
            self.activity = str(first.config.get("secagg_stage", first.stage))
        try:
            result = driver.exchange(round_id, messages, self.config.job.round_timeout_s)
        except Exception as exc:
            with contextlib.suppress(AttributeError):
                setattr(exc, _FROM_DRIVER, True)
            raise
        stats = self.round_stats
        stats.seconds_exchange = (stats.seconds_exchange or 0.0) + time.monotonic() - start
        stats.bytes_down += result.bytes_down
        stats.bytes_up += result.bytes_up
        stats.failures.update(result.failures)
        for cid, reply in sorted(result.replies.items()):
            try:
                result.reports[cid] = read_report(reply.config)
            except ReplyRejected as exc:
                del result.replies[cid]
                self.reject(cid, str(exc))
        train_times = [r.seconds_train for r in result.reports.values() if r.seconds_train is not None]
        if train_times:
            stats.seconds_train_max = max(stats.seconds_train_max or 0.0, *train_times)
        return result
