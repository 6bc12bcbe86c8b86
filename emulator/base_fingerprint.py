"""A client's own copy of the base model instead of the coordinator's download (lora mode).

In lora mode the package carries the whole base model: hundreds of MB to tens of
GB that a client often has already. The package also carries the base model's
*fingerprint* (one sha256 per tensor, :data:`FINGERPRINT_FILE`), and the
coordinator offers a second, slim package without the weight files: only the
config, tokenizer, adapter, job spec, fingerprint and the few tensors the job
itself initialised (a new classification head, :data:`NEW_TENSORS_FILE`).

A client given ``--base-model DIR`` downloads the slim package, loads ``DIR``
the way the coordinator loaded its model (same task head, same seed), puts the
job-initialised tensors in, and checks every tensor against the fingerprint
before it writes the weights into its package folder. Any difference (another
checkpoint, a quantised copy, another revision) is refused with the first
differing tensor named, so a client can never train on a base that differs
from everyone else's; the weights it ends up with are bitwise the coordinator's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from emulator.exposure import state_digests
from emulator.models import load_model, resolve_model_path
from emulator.package import JobSpec, PackageError

FINGERPRINT_FILE = "base-fingerprint.json"
NEW_TENSORS_FILE = "job-initialized.safetensors"  # in model/ of the slim package only
MODEL_DIR = "model"


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return name.endswith((".safetensors", ".bin")) or name.endswith((".safetensors.index.json", ".bin.index.json"))


def write_fingerprint(model: PreTrainedModel, new_tensors: list[str], folder: Path) -> None:
    """Record every tensor's digest and which ones the job initialised (``folder`` is the package)."""
    payload = {"tensors": state_digests(model.state_dict()), "job_initialized": sorted(new_tensors)}
    (folder / FINGERPRINT_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True))


def write_slim_package(folder: Path, slim: Path) -> None:
    """``slim`` = the package ``folder`` without the base model's weight files, plus the tensors the
    job initialised (read back from those files)."""
    fingerprint = json.loads((folder / FINGERPRINT_FILE).read_text())
    wanted = set(fingerprint["job_initialized"])
    new: dict[str, torch.Tensor] = {}
    shutil.rmtree(slim, ignore_errors=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] == MODEL_DIR and _is_weight_file(path):
            if path.name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt") as weights:
                    new.update({name: weights.get_tensor(name) for name in wanted & set(weights.keys())})
            continue
        (slim / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, slim / relative)
    if set(new) != wanted:
        raise PackageError(f"the package's weights lack job-initialised tensors {sorted(wanted - set(new))}")
    (slim / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    save_file(new, str(slim / MODEL_DIR / NEW_TENSORS_FILE))


def restore_base_weights(folder: Path, own_model: str | Path) -> None:
    """Fill an unpacked slim package's ``model/`` with weights from the client's own copy, verified.

    Raises :class:`PackageError` (nothing written) if any tensor differs from the fingerprint.
    """
    spec = JobSpec.load(folder)
    if spec.mode != "lora":
        raise PackageError("--base-model applies to lora jobs only: an offsite job ships an emulator, not the model")
    try:
        fingerprint = json.loads((folder / FINGERPRINT_FILE).read_text())
        new = load_file(str(folder / MODEL_DIR / NEW_TENSORS_FILE))
    except (OSError, ValueError) as exc:
        raise PackageError(f"the slim package is incomplete: {exc}") from exc
    source = resolve_model_path(own_model)
    model = load_model(source, spec.task, spec.labels, seed=spec.seed, pooling=spec.pooling)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in new.items():
            if name not in state or state[name].shape != tensor.shape:
                raise PackageError(f"--base-model {source}: it has no tensor {name} shaped {tuple(tensor.shape)}")
            state[name].copy_(tensor)
    expected: dict[str, str] = fingerprint["tensors"]
    actual = state_digests(state)
    differing = sorted(n for n in expected if actual.get(n) != expected[n])
    unexpected = sorted(set(actual) - set(expected))
    if differing or unexpected:
        first = (differing or unexpected)[0]
        raise PackageError(
            f"--base-model {source} is not the job's base model: {len(differing)} tensors differ and "
            f"{len(unexpected)} are extra (first: {first}). Drop --base-model to download the coordinator's copy."
        )
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in Path(tmp).iterdir():
            if _is_weight_file(path):
                path.replace(folder / MODEL_DIR / path.name)
    (folder / MODEL_DIR / NEW_TENSORS_FILE).unlink()
