"""What a round's client phase works with: the transport's interface, the round's books, the outcome.

The engine (:mod:`coordinator.engine`) runs rounds; a client phase
(:mod:`coordinator.plain_phase`, :mod:`coordinator.secure_phase`) turns one
round's sampled clients into an aggregate through a :class:`Driver`. Both
sides meet here, so neither imports the other's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.config import JobConfig
from coordinator.strategy import State
from protos.codec import Message
from protos.wire import ClientReport, DeclineReason, TrainInstruction


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
    """The coordinator's model, seen through its trainable tensors; one per mode
    (:mod:`coordinator.lora_model`, :mod:`coordinator.offsite_model`), so the engine and the CLIs never ask which."""

    def trainable_state(self) -> State:
        """The tensors clients train and the aggregate updates: all that travels, and all a checkpoint holds."""
        ...

    def set_trainable_state(self, state: State) -> None:
        """Take the optimizer's new state (or a checkpoint's); the frozen rest of the model never changes."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Validation metrics for the round's record (``val_accuracy`` or ``val_perplexity``); empty without data."""
        ...

    def export(self, folder: Path) -> None:
        """Write the tuned model to ``folder`` (what plain transformers loads), built beside it and renamed into
        place, so a failure leaves the folder as it was and at most a ``<folder>.partial`` to remove."""
        ...


class RoundFailed(RuntimeError):
    """A round that produced no update (too few clients, or secure aggregation aborted)."""


@dataclass
class RoundOutcome:
    """Aggregated result of a round's client phase (plain or secure)."""

    delta: State
    completed: list[str]
    train_loss: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundStats:
    """One round's books, kept while its exchanges run: bytes, time, and the clients that fell out."""

    bytes_down: int = 0
    bytes_up: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # client -> why it counts as dropped
    rejected: dict[str, str] = field(default_factory=dict)  # client -> why its reply was refused
    seconds_exchange: float | None = None
    seconds_train_max: float | None = None  # the slowest client's own training time

    def record_fields(self) -> dict[str, Any]:
        """The metrics-line fields these books fill (timings only once measured)."""
        out: dict[str, Any] = {"bytes_down": self.bytes_down, "bytes_up": self.bytes_up}
        if self.seconds_exchange is not None:
            out["seconds_exchange"] = self.seconds_exchange
        if self.seconds_train_max is not None:
            out["seconds_train_max"] = self.seconds_train_max
        return out


class RoundContext(Protocol):
    """What a client phase may use of the engine running it."""

    config: JobConfig
    round_stats: RoundStats
    client_epsilon: dict[str, float]
    # SecAgg+ keys clients made ahead for the next round they are sampled in (privacy/secagg/prekeys.py):
    # client -> (mask public key, encryption public key); in memory only (a resumed job sets everyone up)
    secagg_prekeys: dict[str, tuple[bytes, bytes]]

    def train_message(self, round_id: int, num_sampled: int) -> Message:
        """The round's train message: the global trainable tensors and the instruction."""
        ...

    def train_instruction(self, num_sampled: int) -> TrainInstruction:
        """What each client is told to do this round (steps, learning rate, its DP settings)."""
        ...

    def exchange(self, driver: Driver, round_id: int, messages: dict[str, Message]) -> Exchange:
        """``driver.exchange`` with the round's books kept: bytes, time, failures, checked reports."""
        ...

    def reject(self, client_id: str, reason: str) -> None:
        """Refuse a client's reply this round: it counts as dropped and is named in ``reject_reasons``."""
        ...


# The client phase of a round: (engine, round, sampled clients, driver) -> outcome.
ClientPhase = Callable[[RoundContext, int, list[str], Driver], RoundOutcome]


def client_privacy_metrics(engine: RoundContext, reports: dict[str, ClientReport]) -> dict[str, Any]:
    """ε the clients report after the round (sample-level DP), named as in the README's metrics.jsonl fields.

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
    declined = sorted(cid for cid, r in reports.items() if r.reason_code == DeclineReason.BUDGET_EXHAUSTED)
    if declined:
        out["budget_exhausted_clients"] = declined
    return out
