"""The job package: what a client downloads once before its first round.

A package is a folder, shipped as one deterministic tar: ``job.json`` (the
job's public settings and the names and shapes of the trainable tensors),
``model/`` (the base model in lora mode, the emulator in offsite mode, with
its tokenizer) and, in lora mode, ``adapter/`` (the shared initial LoRA
factors, so every party starts from the same A and B). The coordinator
rebuilds its own trainable model from the same folder, so names match.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from emulator.job_spec import JobSpec, PackageError
from emulator.lora import load_lora, trainable_shapes
from emulator.models import load_tokenizer
from emulator.offsite_package import prepare_offsite_trainable


def pack(folder: Path) -> bytes:
    """A byte-for-byte reproducible tar of ``folder`` (sorted names, zeroed times and owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(folder)))
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack(blob: bytes, folder: Path) -> None:
    """Extract a package safely (no absolute paths, links or devices: tarfile's data filter)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(folder, filter="data")
            else:  # Python < 3.11.4 (Debian 12 ships 3.11.2) has no filters: the same refusals, by hand
                tar.extractall(folder, members=_plain_members(tar, folder))
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"cannot unpack the job package: {exc}") from exc


def _plain_members(tar: tarfile.TarFile, folder: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders that stay inside ``folder``; anything else is refused (as the data filter)."""
    root = folder.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or member.name.startswith("/") or not target.is_relative_to(root):
            raise tarfile.TarError(f"refusing package member {member.name!r} (not a plain file inside the package)")
        member.mode &= 0o755  # no set-id bits, as the data filter
    return members


def load_base(folder: Path, spec: JobSpec) -> PreTrainedModel:
    model_dir = folder / "model"
    model: PreTrainedModel
    if spec.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model


def load_trainable_model(folder: Path) -> tuple[torch.nn.Module, Any, JobSpec]:
    """(model with exactly the spec's tensors trainable, tokenizer, spec) from an unpacked package."""
    spec = JobSpec.load(folder)
    tokenizer = load_tokenizer(folder / "model")
    base = load_base(folder, spec)
    model: torch.nn.Module
    if spec.mode == "lora":
        model = load_lora(base, folder / "adapter", freeze_a=spec.lora.freeze_a)
    else:
        model = prepare_offsite_trainable(base, folder, spec)
    shapes = {name: list(shape) for name, shape in trainable_shapes(model).items()}
    if shapes != spec.trainable:
        raise PackageError("the package's model does not match its declared trainable tensors")
    model.eval()
    return model, tokenizer, spec
