"""The job spec: what every party of a job must agree on (the job.json of its package); nothing here is private.

The LoRA and offsite settings travel as their typed, validated dataclasses (:mod:`emulator.settings`) and are
stored as plain JSON objects of their fields, the form every earlier version wrote too: a package written before a
setting existed loads with that setting's default, and one written by a later version with a setting this one does
not know is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emulator.settings import LoraSettings, OffsiteSettings, SettingsError, settings_from_dict
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
    lora: LoraSettings = field(default_factory=LoraSettings)
    pooling: str = "cls"  # "mean": the model carries the frozen mean-pooling block (emulator/pooling.py)
    offsite: OffsiteSettings = field(default_factory=OffsiteSettings)
    trainable: dict[str, list[int]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> JobSpec:
        try:
            raw = json.loads((folder / SPEC_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackageError(f"{folder}: no valid {SPEC_FILE}: {exc}") from exc
        if not isinstance(raw, dict):
            raise PackageError(f"{folder}: no valid {SPEC_FILE}: not a JSON object")
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PackageError(f"package format {version} is not {FORMAT_VERSION}")
        try:
            raw["lora"] = settings_from_dict(LoraSettings, raw.get("lora", {}), f"{SPEC_FILE} lora")
            raw["offsite"] = settings_from_dict(OffsiteSettings, raw.get("offsite", {}), f"{SPEC_FILE} offsite")
            return cls(**raw)
        except (SettingsError, TypeError) as exc:
            raise PackageError(f"{folder}: no valid {SPEC_FILE}: {exc}") from exc
