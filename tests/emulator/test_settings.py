"""The typed LoRA and offsite settings: validated where they are written, stored in job.json in the form earlier
versions wrote, and the one source of the job file's and the ``fedsite-emulator`` flags' defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import ConfigError, parse_job
from emulator.cli import parser
from emulator.distill import DistillConfig
from emulator.evaluation import TrainConfig
from emulator.job_spec import JobSpec, PackageError
from emulator.refine import RefineConfig
from emulator.settings import LoraSettings, OffsiteSettings, SettingsError

# a job.json as the version before typed settings wrote it (asdict of the job file's tables), less the keys an
# older version had not yet: those take their defaults
OLD_SPEC: dict[str, Any] = {
    "format_version": 1, "job_name": "old", "mode": "offsite", "task": "classification", "max_length": 32,
    "labels": ["a", "b"], "seed": 3, "pooling": "cls", "trainable": {"classifier.weight": [2, 8]},
    "lora": {"alpha": 16, "dropout": 0.0, "freeze_a": True, "r": 4, "target_modules": ["query", "value"]},
    "offsite": {"adapter_layers": 1, "distill_batch_size": 32, "distill_data": "public.txt", "distill_lr": 0.0001,
                "distill_steps": 10, "keep": 0, "keep_ratio": 0.5, "adapter_lora": True},
}


def _write(folder: Path, spec: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "job.json").write_text(json.dumps(spec))
    return folder


def test_a_previous_versions_job_json_loads_into_the_typed_settings(tmp_path: Path) -> None:
    spec = JobSpec.load(_write(tmp_path / "p", OLD_SPEC))
    assert spec.lora == LoraSettings(r=4, alpha=16, freeze_a=True, target_modules=("query", "value"))
    assert spec.offsite == OffsiteSettings(adapter_layers=1, distill_data="public.txt", distill_steps=10,
                                           adapter_lora=True)
    assert spec.offsite.refine_steps == 0 and spec.lora.top_blocks == 0  # keys added since: their defaults
    # saved again, the file holds the same objects (a resumed job's package is read, not rewritten)
    spec.save(tmp_path / "p")
    again = json.loads((tmp_path / "p" / "job.json").read_text())
    assert {k: v for k, v in again["lora"].items() if k in OLD_SPEC["lora"]} == OLD_SPEC["lora"]
    assert JobSpec.load(tmp_path / "p") == spec


@pytest.mark.parametrize(("change", "message"), [
    ({"lora": {"r": 4, "rank_scaling": True}}, r"job.json lora: unknown key 'rank_scaling'"),
    ({"lora": {"r": 0}}, r"lora.r must be a positive number"),
    ({"offsite": {"distill_batch_size": "32"}}, r"job.json offsite"),
    ({"offsite": None}, r"no valid job.json"),
    ({"format_version": 2}, r"package format 2 is not 1"),
])
def test_a_job_json_that_cannot_be_read_is_a_package_error_naming_it(tmp_path: Path, change: dict,
                                                                     message: str) -> None:
    with pytest.raises(PackageError, match=message):
        JobSpec.load(_write(tmp_path / "p", {**OLD_SPEC, **change}))


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (LoraSettings, {"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
    (LoraSettings, {"top_blocks": -1}, r"lora.top_blocks must be >= 0"),
    (OffsiteSettings, {"keep_ratio": 1.5}, r"offsite.keep_ratio must be in \(0, 1\]"),
    (OffsiteSettings, {"distill_batch_size": 0}, r"offsite.distill_batch_size must be a positive number"),
    (OffsiteSettings, {"refine_steps": 5}, r"offsite.refine_steps > 0 needs offsite.distill_data"),
    (OffsiteSettings, {"distill_hidden_metric": "cosine"}, r"offsite.distill_hidden_metric must be one of token, chan"),
    (OffsiteSettings, {"distill_kl_weight": -1.0}, r"offsite.distill_kl_weight must be in \[0, 100\]"),
])
def test_settings_refuse_bad_values_on_construction(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        cls(**kwargs)


def test_layer_drop_reads_zero_as_automatic_and_keep_over_keep_ratio() -> None:
    assert OffsiteSettings().layer_drop() == {"adapter_layers": None, "keep": None, "keep_ratio": 0.5}
    assert OffsiteSettings(adapter_layers=2, keep=3, keep_ratio=0.25).layer_drop() == {
        "adapter_layers": 2, "keep": 3, "keep_ratio": None}


def test_the_job_file_builds_the_settings_and_its_errors_stay_config_errors() -> None:
    config = parse_job({"lora": {"r": 4, "target_modules": ["query"]}, "offsite": {"keep": 2}}, Path("."))
    assert config.lora == LoraSettings(r=4, target_modules=("query",))
    assert config.offsite == OffsiteSettings(keep=2)
    with pytest.raises(ConfigError, match=r"^lora.alpha must be a positive number, got 0$"):
        parse_job({"lora": {"alpha": 0}}, Path("."))
    with pytest.raises(ConfigError, match=r"lora.target_modules\[0\] must be a string"):
        parse_job({"lora": {"target_modules": [1]}}, Path("."))


def test_every_default_is_the_settings_one() -> None:
    """The job file, the distillation, refinement and reference training runs and the fedsite-emulator flags share
    one default each."""
    offsite = OffsiteSettings()
    build = parser().parse_args(["build", "--model", "m", "--output-dir", "o"])
    assert (build.distill_steps, build.distill_lr, build.distill_batch_size, build.distill_input_noise,
            build.distill_hidden_metric, build.distill_kl_weight, build.keep_ratio, build.adapter_layers) == (
        offsite.distill_steps, offsite.distill_lr, offsite.distill_batch_size, offsite.distill_input_noise,
        offsite.distill_hidden_metric, offsite.distill_kl_weight, offsite.keep_ratio, offsite.adapter_layers)
    evaluate = parser().parse_args(["evaluate", "--model", "m", "--emulator", "e", "--data", "d"])
    assert (evaluate.refine_steps, evaluate.refine_lr) == (offsite.refine_steps, offsite.refine_lr)
    train = TrainConfig()
    assert (evaluate.epochs, evaluate.batch_size, evaluate.lr, evaluate.head_lr) == (
        train.epochs, train.batch_size, train.lr, train.head_lr)
    distill, refine = DistillConfig(), RefineConfig()
    assert (distill.lr, distill.batch_size, distill.input_noise, distill.hidden_metric, distill.kl_weight) == (
        offsite.distill_lr, offsite.distill_batch_size, offsite.distill_input_noise, offsite.distill_hidden_metric,
        offsite.distill_kl_weight)
    assert (refine.lr, refine.temperature) == (offsite.refine_lr, offsite.refine_temperature)
    assert {f.name for f in dataclasses.fields(OffsiteSettings)} <= set(parse_job({}, Path(".")).to_dict()["offsite"])
