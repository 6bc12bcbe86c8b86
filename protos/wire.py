"""The round messages' schema: what the coordinator asks of a client, and what the client reports back.

A :class:`~protos.codec.Message` carries a round, a :class:`Stage`, a JSON
config and named tensors, over gRPC or as a Flower record alike. This module
gives the config a type on both sides: the coordinator writes a
:class:`TrainInstruction` (and, under secure aggregation, a
:class:`SecAggInstruction` around it) with ``to_config``; the client reads it
back with ``from_config`` and answers with a :class:`ClientReport`, which the
coordinator reads with :meth:`ClientReport.from_config` (every field checked
for type, finiteness and range: the client may be hostile) before using any
of it.

Every config carries ``wire_version``. A message of another version (an older
client or coordinator: version 1 had no such key) is refused with an error
that says which side speaks what, never a ``KeyError`` on the first renamed key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protos.codec import Message

WIRE_VERSION = 4  # 1: the untyped configs of fedsite before the schema (no version key); 2: the schema, with
# SecAgg+ pair masks keyed with 256 bits; 3: pair masks keyed with 128 bits (2's and 3's masks would not cancel);
# 4: SecAgg+ unmask replies carry the keys of the next round (privacy/secagg/prekeys.py)
VERSION_KEY = "wire_version"
MAX_EXAMPLES = 2**53  # integers beyond this do not survive a float; no client holds this many examples
MAX_REASON_CHARS = 500


class Stage(StrEnum):
    """What a round message is: an instruction (``train``, ``secagg``) or a client's refusal to follow it.

    A client answers ``train`` and ``secagg`` with the same stage, or with ``declined`` (it chose not to
    take part: budget spent, update unusable) or ``error`` (it could not). The SecAgg+ protocol's own
    stages (``setup``, ``share_keys``, ...) are ``secagg_stage`` inside a ``secagg`` message.
    """

    TRAIN = "train"
    SECAGG = "secagg"
    DECLINED = "declined"
    ERROR = "error"


class DeclineReason(StrEnum):
    """Why a client declined or failed, as a code the coordinator can count (the text is for people)."""

    BUDGET_EXHAUSTED = "budget_exhausted"  # sample-level DP: this round would take ε past the client's maximum
    DP_PLAN = "dp_plan"  # sample-level DP: no noise multiplier fits the client's data and the job's settings
    DIVERGED = "diverged"  # local training produced a non-finite update
    CLIENT_DP = "client_dp"  # the update could not be clipped for client-level DP
    SECAGG = "secagg"  # a secure aggregation step was refused
    WIRE_VERSION = "wire_version"  # the coordinator's message is of another wire version
    FAILED = "failed"  # the task raised; the reason says what


class WireError(ValueError):
    """A round message this side cannot read; the message names the key or the version."""


class WireVersionError(WireError):
    """A round message of another wire version."""


class ReplyRejected(WireError):
    """A reply whose report cannot be trusted; the message names the field and why."""


def check_version(config: Mapping[str, Any], sender: str, error: type[WireError] = WireVersionError) -> None:
    """Refuse a config of another wire version, saying which side speaks which."""
    if not isinstance(config, Mapping):
        raise error(f"the {sender}'s message config is not an object")
    version = config.get(VERSION_KEY)
    if version == WIRE_VERSION and isinstance(version, int) and not isinstance(version, bool):
        return
    theirs = "1 (no wire_version)" if version is None else _show(version)
    raise error(f"the {sender} speaks wire version {theirs}, this side speaks {WIRE_VERSION}: "
                "run the same fedsite release on the coordinator and the clients")


def _require(config: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in config:
        raise WireError(f"{what} lacks {key!r}")
    return config[key]


# -- coordinator -> client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalDPInstruction:
    """Sample-level DP-SGD for this round (``[privacy.local_dp]``); the client plans σ for the rounds left."""

    delta: float
    max_grad_norm: float
    max_epsilon: float
    rounds: int  # the job's rounds: a calibrating client plans for taking part in every round left
    accountant: str = "rdp"
    head_clip_fraction: float = 0.0
    target_epsilon: float | None = None  # set: the client calibrates σ; else noise_multiplier is σ
    noise_multiplier: float | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"delta": self.delta, "max_grad_norm": self.max_grad_norm,
                                  "head_clip_fraction": self.head_clip_fraction, "max_epsilon": self.max_epsilon,
                                  "accountant": self.accountant, "rounds": self.rounds}
        if self.target_epsilon is not None:
            config["target_epsilon"] = self.target_epsilon
        else:
            config["noise_multiplier"] = self.noise_multiplier
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalDPInstruction:
        what = "the local_dp instruction"
        target = config.get("target_epsilon")
        sigma = None if target is not None else _require(config, "noise_multiplier", what)
        return cls(delta=float(_require(config, "delta", what)),
                   max_grad_norm=float(_require(config, "max_grad_norm", what)),
                   max_epsilon=float(_require(config, "max_epsilon", what)),
                   rounds=int(_require(config, "rounds", what)),
                   accountant=str(config.get("accountant", "rdp")),
                   head_clip_fraction=float(config.get("head_clip_fraction", 0.0)),
                   target_epsilon=float(target) if target is not None else None,
                   noise_multiplier=float(sigma) if sigma is not None else None)


@dataclass(frozen=True)
class ClientDPInstruction:
    """Client-level DP (``[privacy.client_dp]``): clip the update, and add a noise share when distributed."""

    clip_norm: float
    noise_multiplier: float
    distributed: bool
    num_clients: int  # sampled this round: each adds 1/num_clients of the noise's variance

    def to_config(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                "distributed": self.distributed, "num_clients": self.num_clients}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientDPInstruction:
        what = "the client_dp instruction"
        return cls(clip_norm=float(_require(config, "clip_norm", what)),
                   noise_multiplier=float(_require(config, "noise_multiplier", what)),
                   distributed=bool(config.get("distributed", False)),
                   num_clients=int(_require(config, "num_clients", what)))


@dataclass(frozen=True)
class TrainInstruction:
    """What every sampled client does this round (``[train]`` and the privacy tables)."""

    local_steps: int
    batch_size: int
    lr: float
    physical_batch_size: int = 0
    cache_frozen_prefix: bool = False
    weight_decay: float = 0.0
    head_lr: float = 0.0
    seed: int = 0
    local_dp: LocalDPInstruction | None = None
    client_dp: ClientDPInstruction | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            VERSION_KEY: WIRE_VERSION,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "physical_batch_size": self.physical_batch_size,
            "cache_frozen_prefix": self.cache_frozen_prefix,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "head_lr": self.head_lr,
            "seed": self.seed,
        }
        if self.local_dp is not None:
            config["local_dp"] = self.local_dp.to_config()
        if self.client_dp is not None:
            config["client_dp"] = self.client_dp.to_config()
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        check_version(config, "coordinator")
        what = "the train instruction"
        local_dp, client_dp = config.get("local_dp"), config.get("client_dp")
        return cls(local_steps=int(_require(config, "local_steps", what)),
                   batch_size=int(_require(config, "batch_size", what)),
                   lr=float(_require(config, "lr", what)),
                   physical_batch_size=int(config.get("physical_batch_size", 0)),
                   cache_frozen_prefix=bool(config.get("cache_frozen_prefix", False)),
                   weight_decay=float(config.get("weight_decay", 0.0)),
                   head_lr=float(config.get("head_lr", 0.0)),
                   seed=int(config.get("seed", 0)),
                   local_dp=LocalDPInstruction.from_config(local_dp) if local_dp else None,
                   client_dp=ClientDPInstruction.from_config(client_dp) if client_dp else None)


@dataclass(frozen=True)
class SecAggInstruction:
    """One SecAgg+ stage for one client; the masked-input stage carries the round's training too."""

    client_index: int  # the client's id inside the SecAgg+ protocol
    secagg_stage: str  # privacy.secagg.Stage, as its value
    weight_cap: float  # examples at which a client's weight in the secure sum reaches 1
    train: TrainInstruction | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {VERSION_KEY: WIRE_VERSION, "secagg_id": self.client_index,
                                  "secagg_stage": self.secagg_stage, "secagg_weight_cap": self.weight_cap}
        if self.train is not None:
            config.update(self.train.to_config())
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SecAggInstruction:
        check_version(config, "coordinator")
        what = "the secure aggregation instruction"
        return cls(client_index=int(_require(config, "secagg_id", what)),
                   secagg_stage=str(_require(config, "secagg_stage", what)),
                   weight_cap=float(_require(config, "secagg_weight_cap", what)),
                   train=TrainInstruction.from_config(config) if "local_steps" in config else None)


# -- client -> coordinator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientReport:
    """What a client says about its round; None where it did not send the field."""

    num_examples: int | None = None
    train_loss: float | None = None
    steps: int | None = None
    seconds_train: float | None = None
    epsilon: float | None = None
    epsilon_expected: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    update_norm: float | None = None
    secagg_weight: float | None = None
    reason: str = ""  # declined / error: for people
    reason_code: DeclineReason | None = None  # declined / error: for the coordinator

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {VERSION_KEY: WIRE_VERSION}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                config[name] = value
        if self.reason:
            config["reason"] = self.reason
        if self.reason_code is not None:
            config["reason_code"] = self.reason_code.value
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientReport:
        """The report in a reply's config, every field checked; ReplyRejected names the first that fails.

        A reply's config is JSON the client wrote: any key may hold any JSON value (strings, nested
        objects, huge integers, and NaN or Infinity, which Python's JSON parser accepts). The
        coordinator reads reports only, never ``reply.config``, so a hostile value cannot reach a
        ``float()`` call, a weighted mean or a metrics line. Unknown keys are ignored.
        """
        if not isinstance(config, Mapping):
            raise ReplyRejected("the reply's config is not an object")
        check_version(config, "client", ReplyRejected)
        values: dict[str, Any] = {}
        for name, (kind, lowest, highest) in _FIELDS.items():
            if name in config and config[name] is not None:
                values[name] = _number(name, config[name], kind, lowest, highest)
        reason = config.get("reason", "")
        if not isinstance(reason, str):
            raise ReplyRejected(f"reason must be text, got {type(reason).__name__}")
        values["reason"] = reason[:MAX_REASON_CHARS]
        code = config.get("reason_code")
        if code is not None:
            if code not in set(DeclineReason):
                raise ReplyRejected(f"reason_code must be one of {', '.join(DeclineReason)}, got {_show(code)}")
            values["reason_code"] = DeclineReason(code)
        return cls(**values)


# field -> (kind, lowest, highest)
_FIELDS: dict[str, tuple[type, float, float]] = {
    "num_examples": (int, 1, MAX_EXAMPLES),
    "train_loss": (float, -1e6, 1e6),
    "steps": (int, 0, 10**9),
    "seconds_train": (float, 0.0, 1e7),
    "epsilon": (float, 0.0, 1e9),
    "epsilon_expected": (float, 0.0, 1e9),
    "noise_multiplier": (float, 0.0, 1e9),
    "delta": (float, 0.0, 1.0),
    "update_norm": (float, 0.0, 1e30),
    "secagg_weight": (float, 0.0, 1.0),
}


def _number(name: str, value: Any, kind: type, lowest: float, highest: float) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyRejected(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ReplyRejected(f"{name} must be finite, got {value}")
    if kind is int and not isinstance(value, int):
        raise ReplyRejected(f"{name} must be an integer, got {_show(value)}")
    if not lowest <= value <= highest:
        raise ReplyRejected(f"{name} must be in [{lowest:g}, {highest:g}], got {_show(value)}")
    return value if kind is int else float(value)


def _show(value: Any) -> str:
    """A short, log-safe rendering of what the other side sent."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_report(config: Mapping[str, Any]) -> ClientReport:
    """The checked report in a reply's config (see :meth:`ClientReport.from_config`)."""
    return ClientReport.from_config(config)


def refusal(round_id: int, code: DeclineReason, reason: str, *, stage: Stage = Stage.DECLINED,
            report: ClientReport | None = None) -> Message:
    """A reply that declines the round (or, with ``stage=ERROR``, says the client failed), with what it knows."""
    values = {name: getattr(report, name) for name in _FIELDS} if report is not None else {}
    return Message(round=round_id, stage=stage,
                   config=ClientReport(**values, reason=reason, reason_code=code).to_config())
