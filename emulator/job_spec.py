"""The job spec: what every party of a job must agree on (the job.json of its package); nothing here is private."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emulator.lora import LoraSettings
from localio.errors import user_error

SPEC_FILE = "job.json"
FORMAT_VERSION = 1


@user_error
class PackageError(ValueError):
    """A package that is corrupt, incomplete or for another job."""


@dataclass
class JobSpec:
    """What every party must agree on; nothing here is private."""

    job_name: str
    mode: str
    task: str
    max_length: int
    labels: list[str]
    seed: int
    lora: dict[str, Any] = field(default_factory=dict)
    pooling: str = "cls"  # "mean": the model carries the frozen mean-pooling block (emulator/pooling.py)
    offsite: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, list[int]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def lora_settings(self) -> LoraSettings:
        values = dict(self.lora)
        values["target_modules"] = tuple(values.get("target_modules", ()))
        return LoraSettings(**values)

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> JobSpec:
        try:
            raw = json.loads((folder / SPEC_FILE).read_text())
            spec = cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise PackageError(f"{folder}: no valid {SPEC_FILE}: {exc}") from exc
        if spec.format_version != FORMAT_VERSION:
            raise PackageError(f"package format {spec.format_version} is not {FORMAT_VERSION}")
        return spec
