"""--resume with a changed job file: operational keys may change, training keys need --allow-job-change, the
model's shape never changes (before, LoRA rank 8 -> 4 was accepted silently and mixed the two runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import ConfigError, parse_job
from coordinator.job import JOB_RECORD, _json, changed_job_keys, check_resumed_job

BASE: dict[str, Any] = {"job": {"name": "r", "rounds": 3}, "train": {"lr": 1e-3}, "lora": {"r": 8}}


def _record(tmp: Path, table: dict[str, Any]) -> Path:
    out = tmp / "run"
    out.mkdir(exist_ok=True)
    (out / JOB_RECORD).write_text(_json(parse_job(table, tmp).to_dict()))
    return out


def _with(section: str, **values: Any) -> dict[str, Any]:
    table = {k: dict(v) for k, v in BASE.items()}
    table.setdefault(section, {}).update(values)
    return table


def test_operational_changes_resume_silently(tmp_path: Path) -> None:
    out = _record(tmp_path, BASE)
    for table in (_with("job", rounds=10), _with("job", round_timeout_s=30.0, heartbeat_timeout_s=20.0),
                  _with("data", validation_max_examples=10), BASE):
        check_resumed_job(parse_job(table, tmp_path), out, allow_changes=False)


def test_training_changes_are_named_and_need_the_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = _record(tmp_path, BASE)
    changed = parse_job(_with("train", lr=5e-4, weight_decay=0.1), tmp_path)
    with pytest.raises(ConfigError, match=r"changes train\.lr, train\.weight_decay since the run started.*"
                                          r"--allow-job-change") as info:
        check_resumed_job(changed, out, allow_changes=False)
    assert "\n" not in str(info.value)
    caplog.set_level(logging.WARNING, logger="fedsite.job")
    check_resumed_job(changed, out, allow_changes=True)
    assert "train.lr, train.weight_decay" in caplog.text
    for table in (_with("server", optimizer="fedadam"), _with("job", seed=1),
                  _with("privacy", client_dp={"enabled": True})):
        with pytest.raises(ConfigError, match="allow-job-change"):
            check_resumed_job(parse_job(table, tmp_path), out, allow_changes=False)


def test_the_models_shape_can_never_change(tmp_path: Path) -> None:
    out = _record(tmp_path, BASE)
    for table, key in ((_with("lora", r=4), "lora.r"), (_with("job", mode="offsite"), "job.mode"),
                       (_with("model", max_length=128), "model.max_length")):
        with pytest.raises(ConfigError, match=rf"changes {key}, which shape the model"):
            check_resumed_job(parse_job(table, tmp_path), out, allow_changes=True)


def test_keys_added_since_the_run_started_count_at_their_default(tmp_path: Path) -> None:
    out = _record(tmp_path, BASE)
    record = (out / JOB_RECORD).read_text().replace('"max_update_norm": 0.0,', "")
    assert '"max_update_norm"' not in record  # as written by a fedsite that did not know the key
    (out / JOB_RECORD).write_text(record)
    assert changed_job_keys(parse_job(BASE, tmp_path), out) == []
    assert changed_job_keys(parse_job(_with("server", max_update_norm=2.0), tmp_path), out) == \
        ["server.max_update_norm"]
