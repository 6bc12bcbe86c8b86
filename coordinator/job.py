"""A job on the coordinator: from a validated job file to a model, a package and an engine.

Shared by the gRPC coordinator and the Flower simulation: both call
:func:`prepare_job` and get the same package, the same global model and the
same engine; only the driver differs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from coordinator.checkpoint import Checkpointer
from coordinator.config import ConfigError, JobConfig
from coordinator.engine import ClientPhase, RoundEngine
from coordinator.lora_model import LoraGlobalModel
from coordinator.metrics import MetricsLog
from coordinator.offsite_model import OffsiteGlobalModel
from coordinator.rounds import GlobalModel
from emulator.base_fingerprint import FINGERPRINT_FILE, write_fingerprint, write_slim_package
from emulator.lora import add_lora, trainable_state
from emulator.models import load_model_and_new_tensors, load_tokenizer, resolve_model_path
from emulator.offsite_package import write_offsite_package
from emulator.package import JobSpec, pack
from emulator.tasks import EncodedExamples, encode
from localio.atomic import atomic_write_bytes, atomic_write_text
from localio.data import DataError, label_set, read_examples, sample
from protos.codec import sha256_hex

log = logging.getLogger("fedsite.job")


@dataclass
class Package:
    """The job package as built: the unpacked folder the coordinator loads, the blob clients download and
    its sha256; in lora mode also the slim blob for clients that bring their own base model.
    """
    folder: Path
    blob: bytes
    sha256: str
    spec: JobSpec
    slim: bytes | None = None  # lora mode: the package without the base weights, for clients with their own copy
    slim_sha256: str = ""


def job_labels(config: JobConfig) -> list[str]:
    """The job's class names: ``[model] labels``, else the sorted labels of the validation file; none for causal LM."""
    if config.model.task != "classification":
        return []
    if config.model.labels:
        return list(config.model.labels)
    if not config.data.validation:
        raise ConfigError("model.labels is empty and data.validation is not set: cannot know the labels")
    return label_set(read_examples(config.resolve(config.data.validation), need_label=True))


Report = Callable[[str], None]
"""Receives a one-line status of a long preparation ("distilling the emulator: step 40/600, ...")."""


def build_package(config: JobConfig, output_dir: Path, *, report: Report | None = None) -> Package:
    """Write the package folder and its tar once; a resumed job reuses them byte for byte."""
    say = report or (lambda _text: None)
    folder = output_dir / "package"
    tar_path = output_dir / "package.tar"
    if tar_path.exists() and (folder / "job.json").exists():
        blob = tar_path.read_bytes()
        return _with_slim(Package(folder, blob, sha256_hex(blob), JobSpec.load(folder)), output_dir)
    shutil.rmtree(folder, ignore_errors=True)
    say("loading the model")
    labels = job_labels(config)
    model_dir = resolve_model_path(config.model.path, config.base_dir)
    tokenizer = load_tokenizer(model_dir)
    base, job_initialized = load_model_and_new_tensors(model_dir, config.model.task, labels, seed=config.job.seed,
                                                       pooling=config.model.pooling)
    spec = JobSpec(
        job_name=config.job.name, mode=config.job.mode, task=config.model.task,
        max_length=config.model.max_length, labels=labels, seed=config.job.seed, pooling=config.model.pooling,
        lora=config.lora, offsite=config.offsite,
    )
    (folder / "model").mkdir(parents=True)
    if config.job.mode == "lora":
        base.save_pretrained(str(folder / "model"), safe_serialization=True)
        write_fingerprint(base, job_initialized, folder)
        tokenizer.save_pretrained(str(folder / "model"))
        peft_model = add_lora(base, config.lora, task=config.model.task, seed=config.job.seed)
        peft_model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        spec.trainable = {n: list(t.shape) for n, t in trainable_state(peft_model).items()}
    else:
        say("building the emulator")
        write_offsite_package(base, tokenizer, spec, folder, base_dir=config.base_dir, report=report)
    say("writing the package")
    spec.save(folder)
    blob = pack(folder)
    atomic_write_bytes(tar_path, blob)
    return _with_slim(Package(folder, blob, sha256_hex(blob), spec), output_dir)


def _with_slim(package: Package, output_dir: Path) -> Package:
    """Add the slim package (written once, beside the full one) when the package has a base fingerprint."""
    if not (package.folder / FINGERPRINT_FILE).exists():
        return package  # offsite mode (the emulator is not the client's to have)
    slim_path = output_dir / "package-slim.tar"
    if not slim_path.exists():
        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
            write_slim_package(package.folder, Path(tmp) / "slim")
            atomic_write_bytes(slim_path, pack(Path(tmp) / "slim"))
    package.slim = slim_path.read_bytes()
    package.slim_sha256 = sha256_hex(package.slim)
    return package


@dataclass
class PreparedJob:
    """What a driver needs to run a job: the package to serve, the global model to export, the engine to run."""
    config: JobConfig
    output_dir: Path
    package: Package
    model: GlobalModel
    engine: RoundEngine


def load_validation(config: JobConfig, tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> EncodedExamples | None:
    """The coordinator's validation examples, sampled and encoded once for every round's evaluation;
    a label the job does not know is a DataError naming it, not a silent miss.
    """
    if not config.data.validation:
        return None
    path = config.resolve(config.data.validation)
    examples = read_examples(path, need_label=config.model.task == "classification")
    examples = sample(examples, config.data.validation_max_examples, config.job.seed)
    label2id = {label: i for i, label in enumerate(labels)}
    if config.model.task == "classification":
        unknown = [e for e in examples if e.label not in label2id]
        if unknown:
            raise DataError(f"{path}: label {unknown[0].label!r} is not in model.labels")
    return encode(examples, tokenizer, task=config.model.task, max_length=config.model.max_length,
                  label2id=label2id)


def check_output_dir(output_dir: Path, *, resume: bool) -> None:
    """Create ``output_dir``; refuse one that holds a run unless resuming it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (Checkpointer(output_dir / "checkpoints").latest() is not None
                       or (output_dir / "metrics.jsonl").exists()):
        raise ConfigError(
            f"output directory {output_dir} already holds a run; pass --resume to continue it "
            "or choose another --output-dir"
        )


# Keys a resumed run may change freely: how long to wait, how many rounds, who may connect, what to evaluate on.
# Any other change alters the training the checkpoints hold (see check_resumed_job).
OPERATIONAL_KEYS = frozenset({
    "job.name", "job.rounds", "job.round_timeout_s", "job.heartbeat_timeout_s", "job.wait_for_clients_s",
    "job.sample_grace_s", "job.min_clients", "job.clients_per_round", "data.validation",
    "data.validation_max_examples", "enrollment.tokens_file", "tls.cert", "tls.key", "tls.client_ca",
})
# Keys that shape the model and its package: the checkpoints cannot continue under another value.
STRUCTURAL_PREFIXES = ("job.mode", "model.", "lora.", "offsite.")
STRUCTURAL_EXCEPTIONS = ("offsite.refine_",)  # refinement only runs at export
JOB_RECORD = "job.toml.json"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_job_keys(config: JobConfig, output_dir: Path) -> list[str]:
    """Keys whose value differs from the job recorded in ``output_dir`` (keys added since count at default)."""
    record = output_dir / JOB_RECORD
    if not record.exists():
        return []
    try:
        old = _flatten(json.loads(record.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {record} (the job this run was started with): {exc}") from exc
    new = _flatten(json.loads(_json(config.to_dict())))
    defaults = _flatten(json.loads(_json(JobConfig().to_dict())))
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]


def check_resumed_job(config: JobConfig, output_dir: Path, *, allow_changes: bool) -> None:
    """Refuse to resume a run with a job file that would mix two trainings (LoRA rank 8 then 4, another lr...).

    Operational keys may change. Keys that shape the model never may. Training keys (train, server, privacy, the
    seed) may with ``allow_changes`` (--allow-job-change), and the change is logged.
    """
    changed = [k for k in changed_job_keys(config, output_dir) if k not in OPERATIONAL_KEYS]
    if not changed:
        return
    structural = [k for k in changed if k.startswith(STRUCTURAL_PREFIXES) and not k.startswith(STRUCTURAL_EXCEPTIONS)]
    if structural:
        raise ConfigError(
            f"cannot resume {output_dir}: the job file changes {', '.join(structural)}, which shape the model its "
            "checkpoints hold; restore the job file, or start a new run with another --output-dir")
    if not allow_changes:
        raise ConfigError(
            f"cannot resume {output_dir}: the job file changes {', '.join(changed)} since the run started; restore "
            "them, or pass --allow-job-change to continue the run with the new values")
    log.warning("resuming %s with changed training settings: %s", output_dir, ", ".join(changed))


def prepare_job(config: JobConfig, output_dir: Path, *, resume: bool = False,
                client_phase: ClientPhase | None = None, report: Report | None = None,
                allow_job_change: bool = False) -> PreparedJob:
    """``report`` hears what the preparation is doing (the coordinator passes it on to waiting clients).

    A resumed run checks the job file against the one it started with (:func:`check_resumed_job`).
    """
    check_output_dir(output_dir, resume=resume)
    if resume:
        check_resumed_job(config, output_dir, allow_changes=allow_job_change)
    checkpointer = Checkpointer(output_dir / "checkpoints")
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    atomic_write_text(output_dir / JOB_RECORD, _json(config.to_dict()))
    package = build_package(config, output_dir, report=report)
    if report is not None:
        report("loading the validation data and the global model")
    tokenizer = load_tokenizer(package.folder / "model")
    validation = load_validation(config, tokenizer, package.spec.labels)
    model: GlobalModel
    if config.job.mode == "lora":
        model = LoraGlobalModel(package, validation, tokenizer, cache_prefix=config.train.cache_frozen_prefix)
    else:
        model = OffsiteGlobalModel(config, package, validation, tokenizer)
    engine = RoundEngine(config, model, checkpointer, metrics, client_phase=client_phase)
    if resume:
        engine.resume()
    return PreparedJob(config, output_dir, package, model, engine)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
