"""A lora client with its own copy of the base model: the slim package plus that copy gives bitwise the
coordinator's weights, and any other model is refused before a round is trained on it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertModel

from coordinator.config import parse_job
from coordinator.job import build_package
from emulator.base_fingerprint import FINGERPRINT_FILE, NEW_TENSORS_FILE, restore_base_weights
from emulator.models import ModelLoadError
from emulator.package import PackageError, load_trainable_model, unpack


def _job(model_dir: Path) -> dict[str, Any]:
    return {
        "job": {"name": "own-base", "rounds": 1, "clients_per_round": 1, "min_clients": 1, "seed": 3},
        "model": {"path": str(model_dir), "max_length": 32, "labels": ["a", "b", "c"]},
        "train": {"local_steps": 1, "batch_size": 4},
        "lora": {"r": 4},
    }


def _names(blob: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return set(tar.getnames())


def test_slim_package_and_own_copy_give_the_coordinators_weights_bitwise(tiny_bert_dir: Path,
                                                                         tmp_path: Path) -> None:
    package = build_package(parse_job(_job(tiny_bert_dir), tmp_path), tmp_path / "out")
    assert package.slim is not None and package.slim_sha256
    full_names, slim_names = _names(package.blob), _names(package.slim)
    assert "model/model.safetensors" in full_names and "model/model.safetensors" not in slim_names
    assert {FINGERPRINT_FILE, f"model/{NEW_TENSORS_FILE}", "adapter/adapter_model.safetensors",
            "job.json", "model/config.json"} <= slim_names
    assert len(package.slim) < len(package.blob) / 2

    folder = tmp_path / "client"
    unpack(package.slim, folder)
    restore_base_weights(folder, tiny_bert_dir)
    assert not (folder / "model" / NEW_TENSORS_FILE).exists()
    mine, _, _ = load_trainable_model(folder)
    theirs, _, _ = load_trainable_model(package.folder)
    mine_state, theirs_state = mine.state_dict(), theirs.state_dict()
    assert mine_state.keys() == theirs_state.keys()
    for name, tensor in theirs_state.items():
        assert torch.equal(mine_state[name], tensor), name
    # the new classification head came from the package, not from the client's own initialisation
    assert any("classifier" in n for n in mine_state)

    # a second build of the same job (a resumed coordinator) serves the same slim bytes
    again = build_package(parse_job(_job(tiny_bert_dir), tmp_path), tmp_path / "out")
    assert again.slim == package.slim


def test_another_base_model_is_refused_with_the_first_differing_tensor(tiny_bert_dir: Path, tmp_path: Path) -> None:
    package = build_package(parse_job(_job(tiny_bert_dir), tmp_path), tmp_path / "out")
    assert package.slim is not None
    other = tmp_path / "other-bert"
    torch.manual_seed(1)  # same architecture and tokenizer, other weights
    BertModel(BertConfig.from_pretrained(str(tiny_bert_dir))).save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_bert_dir / name).exists():
            (other / name).write_bytes((tiny_bert_dir / name).read_bytes())
    folder = tmp_path / "client"
    unpack(package.slim, folder)
    with pytest.raises(PackageError, match=r"is not the job's base model: \d+ tensors differ .*first: bert\."):
        restore_base_weights(folder, other)
    assert not (folder / "model" / "model.safetensors").exists()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        restore_base_weights(folder, tmp_path / "nowhere")
