"""The job file: one TOML file describes a job for the coordinator and the simulator.

The table and key names are a contract (the README's job-file tables); each table is a
dataclass whose fields carry their help text, and loading validates every key
with an error that names it and the allowed values. Relative paths are
resolved against the job file's folder. The ``[lora]`` and ``[offsite]`` tables
are the model code's own settings (:mod:`emulator.settings`, validated on
construction), so their defaults and ranges are written once, there.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.strategy import AGGREGATORS, OPTIMIZERS
from emulator.models import TASKS
from emulator.pooling import POOLINGS
from emulator.settings import LoraSettings, OffsiteSettings, SettingsError
from localio.errors import user_error
from localio.partition import PARTITIONS
from privacy.accounting import ACCOUNTANTS
from privacy.secagg.config import THRESHOLD_RANGE, valid_threshold

MODES = ("lora", "offsite")
MIN_HEARTBEAT_TIMEOUT_S = 3.0


@user_error
class ConfigError(ValueError):
    """A job file that cannot run; the message names the key."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class JobSection:
    """``[job]``: the rounds, and how many clients take part in each and for how long."""
    name: str = _help("job name, used for the output directory", default="fedsite-job")
    mode: str = _help("lora | offsite", default="lora")
    rounds: int = _help("number of federated rounds", default=5)
    clients_per_round: int = _help("clients sampled each round", default=3)
    min_clients: int = _help("fewer completed updates than this: the round fails", default=2)
    round_timeout_s: float = _help("seconds to wait for a round's replies", default=600.0)
    seed: int = _help("seed for sampling, initialisation and data order", default=0)
    heartbeat_timeout_s: float = _help(
        "a client silent this long during a round counts as dropped", default=60.0
    )
    wait_for_clients_s: float = _help(
        "how long to wait for min_clients to enrol before a round", default=3600.0
    )
    sample_grace_s: float = _help(
        "once min_clients are online, wait this long for clients_per_round before sampling", default=10.0
    )

    def validate(self) -> None:
        _choice("job.mode", self.mode, MODES)
        _positive("job.rounds", self.rounds)
        _positive("job.clients_per_round", self.clients_per_round)
        _positive("job.min_clients", self.min_clients)
        if self.min_clients > self.clients_per_round:
            raise ConfigError(
                f"job.min_clients ({self.min_clients}) must be <= job.clients_per_round "
                f"({self.clients_per_round})"
            )
        _positive("job.round_timeout_s", self.round_timeout_s)
        _non_negative("job.wait_for_clients_s", self.wait_for_clients_s)
        _non_negative("job.sample_grace_s", self.sample_grace_s)
        if self.heartbeat_timeout_s < MIN_HEARTBEAT_TIMEOUT_S:
            raise ConfigError(
                f"job.heartbeat_timeout_s must be >= {MIN_HEARTBEAT_TIMEOUT_S} (clients beat at most once a second "
                f"and need room for a late beat), got {self.heartbeat_timeout_s}"
            )


@dataclass
class ModelSection:
    """``[model]``: which model, which task, and how its input is cut and pooled."""
    path: str = _help('"minilm" (the embedded default), "smollm2" (the embedded SmolLM2-135M, a GGUF), a .gguf file '
                      '(converted once into a cached folder), or a local Hugging Face folder', default="minilm")
    task: str = _help("classification | causal-lm", default="classification")
    max_length: int = _help("tokens per example", default=64)
    labels: list[str] = _help("class names; empty = sorted labels of the validation file", default_factory=list)
    pooling: str = _help(
        "classification with a BERT-family model: cls (the stock [CLS] pooler) | mean (a frozen block that mean-pools "
        "the tokens, for sentence-embedding models such as the embedded MiniLM; lora mode)", default="cls")

    def validate(self) -> None:
        _choice("model.task", self.task, TASKS)
        _positive("model.max_length", self.max_length)
        _choice("model.pooling", self.pooling, POOLINGS)
        if self.pooling != "cls" and self.task != "classification":
            raise ConfigError(f"model.pooling = {self.pooling!r} is for task = \"classification\"")


@dataclass
class DataSection:
    """``[data]``: the coordinator's own validation data (clients' training data never appears here)."""
    validation: str = _help("coordinator-side evaluation file (JSONL/CSV, .gz allowed)", default="")
    validation_max_examples: int = _help("evaluate on this many (seeded sample); 0 = all", default=2000)

    def validate(self) -> None:
        if self.validation_max_examples < 0:
            raise ConfigError("data.validation_max_examples must be >= 0")


@dataclass
class TrainSection:
    """``[train]``: what each client does each round; sent to clients in the train instruction."""
    local_steps: int = _help("optimizer steps per client per round", default=30)
    batch_size: int = _help("examples per optimizer step (the logical batch; under DP, the expected Poisson batch)",
                            default=16)
    physical_batch_size: int = _help(
        "rows computed at once: a larger logical batch runs in chunks of this many (memory), same result",
        default=64)
    cache_frozen_prefix: bool = _help(
        "BERT-family classifiers that train only their top (lora.top_blocks, or the head): each client runs the "
        "frozen blocks below once per example and trains on their cached output (those blocks then run without "
        "dropout)", default=True)
    lr: float = _help("client learning rate (AdamW)", default=5e-4)
    weight_decay: float = _help("client AdamW weight decay", default=0.0)
    head_lr: float = _help("learning rate of the task head; 0 = same as lr", default=0.0)

    def validate(self) -> None:
        _positive("train.local_steps", self.local_steps)
        _positive("train.batch_size", self.batch_size)
        _positive("train.physical_batch_size", self.physical_batch_size)
        _positive("train.lr", self.lr)
        _non_negative("train.head_lr", self.head_lr)
        _non_negative("train.weight_decay", self.weight_decay)


@dataclass
class ServerSection:
    """``[server]``: how the coordinator turns the round's updates into the new global state."""
    optimizer: str = _help("fedavg | fedadam", default="fedavg")
    lr: float = _help("server learning rate (1.0 = plain FedAvg)", default=1.0)
    beta1: float = _help("FedAdam first-moment decay", default=0.9)
    beta2: float = _help("FedAdam second-moment decay", default=0.99)
    eps: float = _help("FedAdam adaptivity", default=1e-3)
    aggregator: str = _help("mean | median | trimmed_mean (robust ones need secure aggregation off)",
                            default="mean")
    trim_fraction: float = _help("fraction cut at each end by trimmed_mean", default=0.1)
    max_update_norm: float = _help(
        "L2 bound on each client's update without secure aggregation; a longer one is refused. 0 = automatic: the "
        "largest update an honest client's AdamW can make with [train] (or client_dp's clip_norm plus its noise "
        "share)", default=0.0)
    examples_cap: int = _help(
        "a client's weight in the plain average is min(num_examples, examples_cap): set it near the largest party's "
        "size; a client claiming more counts as this many", default=100_000)

    def validate(self) -> None:
        _choice("server.optimizer", self.optimizer, OPTIMIZERS)
        _choice("server.aggregator", self.aggregator, AGGREGATORS)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"server.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        _positive("server.lr", self.lr)
        _positive("server.eps", self.eps)
        _non_negative("server.max_update_norm", self.max_update_norm)
        _positive("server.examples_cap", self.examples_cap)
        for key, value in (("server.beta1", self.beta1), ("server.beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value}")


@dataclass
class LocalDPSection:
    """``[privacy.local_dp]``: sample-level DP-SGD on each client, and the ε budget it may spend."""
    enabled: bool = _help("sample-level DP-SGD on each client (Opacus)", default=False)
    noise_multiplier: float | None = _help(
        "Gaussian noise / max_grad_norm, fixed for the job (give this or target_epsilon)", default=None)
    target_epsilon: float | None = _help(
        "ε each client reaches after all the job's rounds: every client calibrates its noise multiplier to its own "
        "sampling rate and the planned rounds x local_steps (give this or noise_multiplier)", default=None)
    max_grad_norm: float = _help("per-sample gradient clipping bound", default=1.0)
    head_clip_fraction: float = _help(
        "share of the squared clipping bound given to the task head, the rest to the other trained tensors, each "
        "clipped on its own (same privacy); 0 = one flat clip, where a new head's large gradients take nearly all "
        "of it", default=0.0)
    delta: float = _help("target delta", default=1e-5)
    max_epsilon: float | None = _help(
        "per-client budget across all rounds and restarts; a round past it is declined (default: target_epsilon, "
        "or 8 with a fixed noise_multiplier)", default=None)
    accountant: str = _help("rdp | prv | gdp", default="rdp")

    def validate(self) -> None:
        _choice("privacy.local_dp.accountant", self.accountant, ACCOUNTANTS)
        if self.noise_multiplier is not None:
            _positive("privacy.local_dp.noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("privacy.local_dp.target_epsilon", self.target_epsilon)
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "privacy.local_dp: give noise_multiplier or target_epsilon, not both"
                if self.noise_multiplier is not None else
                "privacy.local_dp: give noise_multiplier (fixed noise) or target_epsilon (noise calibrated per client)")
        if self.target_epsilon is not None and self.accountant == "gdp":
            raise ConfigError("privacy.local_dp.target_epsilon needs accountant = \"rdp\" or \"prv\" (the calibrated "
                              "noise changes between rounds, which 'gdp' cannot compose)")
        _positive("privacy.local_dp.max_grad_norm", self.max_grad_norm)
        if not 0.0 <= self.head_clip_fraction < 1.0:
            raise ConfigError(f"privacy.local_dp.head_clip_fraction must be in [0, 1), got {self.head_clip_fraction}")
        _probability("privacy.local_dp.delta", self.delta)
        if self.max_epsilon is not None:
            _positive("privacy.local_dp.max_epsilon", self.max_epsilon)
            if self.target_epsilon is not None and self.target_epsilon > self.max_epsilon:
                raise ConfigError(f"privacy.local_dp.target_epsilon ({self.target_epsilon}) must be <= max_epsilon "
                                  f"({self.max_epsilon})")

    @property
    def budget(self) -> float:
        """The ε no client may pass (max_epsilon, or the target, or 8)."""
        if self.max_epsilon is not None:
            return self.max_epsilon
        return self.target_epsilon if self.target_epsilon is not None else 8.0


@dataclass
class ClientDPSection:
    """``[privacy.client_dp]``: client-level DP on the aggregate (see privacy/README.md)."""
    enabled: bool = _help("client-level DP on the aggregate (DP-FedAvg)", default=False)
    clip_norm: float = _help("L2 bound on each client's update", default=1.0)
    noise_multiplier: float = _help("noise std / clip_norm on the sum", default=1.0)
    delta: float = _help("target delta", default=1e-5)
    distributed: bool = _help("clients add the noise shares", default=True)

    def validate(self) -> None:
        _positive("privacy.client_dp.clip_norm", self.clip_norm)
        if self.noise_multiplier < 0:
            raise ConfigError("privacy.client_dp.noise_multiplier must be >= 0")
        _probability("privacy.client_dp.delta", self.delta)


@dataclass
class SecureAggregationSection:
    """``[privacy.secure_aggregation]``: SecAgg+, so the coordinator sees only the sum."""
    enabled: bool = _help("SecAgg+: the coordinator learns only the sum", default=False)
    threshold: float = _help("fraction of each neighbourhood needed to unmask", default=0.66)
    clipping_range: float = _help(
        "per-coordinate bound of the quantizer (what an honest client's update may hold in one coordinate); 0 = "
        "automatic: 1.25 x the largest step an honest client's AdamW can make on one coordinate in a round "
        "(client_dp: clip_norm plus its noise share)", default=0.0)
    weight_cap: float = _help(
        "examples at which a client's weight in the secure sum saturates (weights must be bounded)",
        default=10000.0)

    def validate(self) -> None:
        if not valid_threshold(self.threshold):
            raise ConfigError(
                f"privacy.secure_aggregation.threshold must be in {THRESHOLD_RANGE}, got {self.threshold}")
        _non_negative("privacy.secure_aggregation.clipping_range", self.clipping_range)
        _positive("privacy.secure_aggregation.weight_cap", self.weight_cap)


@dataclass
class PrivacySection:
    """``[privacy.*]``: the three protections, each independent of the others."""
    local_dp: LocalDPSection = field(default_factory=LocalDPSection)
    client_dp: ClientDPSection = field(default_factory=ClientDPSection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)

    def validate(self) -> None:
        self.local_dp.validate()
        self.client_dp.validate()
        self.secure_aggregation.validate()


@dataclass
class EnrollmentSection:
    """``[enrollment]``: the tokens that let a client enrol (the coordinator keeps only their hashes)."""
    tokens_file: str = _help("one enrolment token per line", default="tokens.txt")


@dataclass
class TLSSection:
    """``[tls]``: the coordinator's certificate, and the client CA that turns on mutual TLS."""
    cert: str = _help("server certificate (PEM); empty = plaintext", default="")
    key: str = _help("server private key (PEM)", default="")
    client_ca: str = _help("CA for client certificates; set = mutual TLS", default="")

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("tls.cert and tls.key must be given together")
        if self.client_ca and not self.cert:
            raise ConfigError("tls.client_ca needs tls.cert and tls.key")


@dataclass
class SimulationSection:
    """``[simulation]``: the virtual clients of ``fedsite-simulate`` and how one data file is split among them."""
    clients: int = _help("enrolled virtual clients", default=10)
    partition: str = _help("iid | dirichlet | shards", default="dirichlet")
    alpha: float = _help("Dirichlet concentration", default=0.5)
    shards_per_client: int = _help("label shards per client (partition = shards)", default=2)
    train_data: str = _help("one JSONL file split among the clients", default="")
    max_train_examples: int = _help("use this many training examples (seeded sample); 0 = all", default=0)

    def validate(self) -> None:
        _positive("simulation.clients", self.clients)
        _choice("simulation.partition", self.partition, PARTITIONS)
        _positive("simulation.alpha", self.alpha)


@dataclass
class JobConfig:
    """A whole job file, validated: the coordinator and the simulator run the same object, so a job
    means the same thing under both.
    """
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    server: ServerSection = field(default_factory=ServerSection)
    lora: LoraSettings = field(default_factory=LoraSettings)  # validated on construction (emulator/settings.py)
    offsite: OffsiteSettings = field(default_factory=OffsiteSettings)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    enrollment: EnrollmentSection = field(default_factory=EnrollmentSection)
    tls: TLSSection = field(default_factory=TLSSection)
    simulation: SimulationSection | None = None
    base_dir: Path = field(default_factory=Path.cwd)

    def validate(self) -> None:
        """Check every table, then the rules that span tables: a robust aggregator neither with secure
        aggregation (which hides the updates it needs) nor with client-level DP (whose noise is calibrated
        to the mean), mean pooling only in lora mode, refinement on generated text only for causal LMs.
        ConfigError names the key.
        """
        for section in (self.job, self.model, self.data, self.train, self.server, self.privacy, self.tls):
            section.validate()
        if self.simulation is not None:
            self.simulation.validate()
        if self.server.aggregator != "mean" and self.privacy.secure_aggregation.enabled:
            raise ConfigError(
                f"server.aggregator = {self.server.aggregator!r} needs each client's update, which secure "
                "aggregation hides; use aggregator = \"mean\" or turn privacy.secure_aggregation off")
        if self.model.pooling == "mean" and self.job.mode != "lora":
            raise ConfigError("model.pooling = \"mean\" is for mode = \"lora\" (offsite mode trains the top blocks, "
                              "which would include the pooling block)")
        offsite = self.offsite
        if offsite.refine_steps and offsite.refine_text == "generated" and self.model.task != "causal-lm":
            raise ConfigError("offsite.refine_text = \"generated\" needs model.task = \"causal-lm\" (a classifier "
                              "writes no text); use refine_text = \"public\" with distill_data")
        if self.server.aggregator != "mean" and self.privacy.client_dp.enabled:
            raise ConfigError("server.aggregator must be \"mean\" with privacy.client_dp (its noise is calibrated "
                              "to the mean)")

    def resolve(self, relative: str) -> Path:
        """A path from the job file, relative to the job file's folder."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The job as plain tables (``job.toml.json`` in the run folder), without the machine-specific ``base_dir``."""
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        if data["simulation"] is None:
            data.pop("simulation")
        return data


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key} must be a positive number, got {value}")


def _non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{key} must be a number >= 0, got {value}")


def _probability(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key} must be in (0, 1), got {value}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one TOML value against a field's type (ints are accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(key, value, inner[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return _build(annotation, value, key)  # type: ignore[arg-type]
    if origin in (list, tuple):  # tuple[X, ...]: a frozen settings class's list
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list")
        items = [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML spells them nan and inf; no key means either
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(table) - fields)
    if unknown:
        where = f"[{prefix}]" if prefix else "the job file"
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(f"{prefix}.{name}" if prefix else name, value, hints[name])
        for name, value in table.items()
    }
    try:
        return cls(**kwargs)
    except SettingsError as exc:  # the emulator's settings validate themselves, naming the key
        raise ConfigError(str(exc)) from exc


def parse_job(table: dict[str, Any], base_dir: Path) -> JobConfig:
    """A validated job from already-parsed TOML tables; paths resolve against ``base_dir``."""
    config: JobConfig = _build(JobConfig, table, "")
    config.base_dir = base_dir.resolve()
    config.validate()
    return config


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a job file; every failure is a ConfigError naming the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from exc
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_job(table, path.parent)
