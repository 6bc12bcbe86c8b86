"""``fedsite-emulator build`` / ``evaluate`` end to end on tiny saved models."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from emulator.architectures import num_blocks
from emulator.cli import main
from emulator.layout import LAYOUT_FILENAME, EmulatorLayout
from tests.emulator.test_distill import word_texts, word_tokenizer
from tests.tiny_models import tiny_model


def _save(tmp_path: Path, family: str, task: str) -> Path:
    folder = tmp_path / f"{family}-{task}"
    tiny_model(family, task, layers=6).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_build_with_distillation_and_reload(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    model = _save(tmp_path, "llama", "causal-lm")
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in word_texts(64, seed=5)))
    out = tmp_path / "emu"
    code = main(["build", "--model", str(model), "--output-dir", str(out), "--keep", "1",
                 "--distill-data", str(public), "--distill-steps", "4",
                 "--distill-batch-size", "8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["emulator_blocks"] == [0, 3, 5] and summary["distilled"] is True
    # what the owner gives away: 3 of 6 blocks ship, and the distilled middle block is no longer verbatim
    assert 0 < summary["verbatim_fraction"] < summary["size_fraction"] < 1
    emulator: Any = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(emulator.config) == 3
    layout = EmulatorLayout.load(out)
    assert layout.kept_middle == [3] and layout.extra["task"] == "causal-lm"
    assert (tmp_path / "emu.distill-checkpoint" / "distill_state.safetensors").is_file()
    ids = torch.tensor([[5, 6, 7]])
    assert emulator.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)


def test_build_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(tmp_path, "bert", "classification")
    capsys.readouterr()
    code = main(["build", "--model", str(model), "--output-dir", str(tmp_path / "e"),
                 "--adapter-layers", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedsite-emulator: error:") and "\n" not in err
    assert main(["build", "--model", str(tmp_path / "nope"), "--output-dir", "x"]) == 2
    assert main(["build", "--model", str(model), "--output-dir", str(tmp_path / "e"),
                 "--distill-steps", "3"]) == 2


def test_evaluate_classification_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    model = _save(tmp_path, "bert", "classification")
    emu = tmp_path / "emu"
    assert main(["build", "--model", str(model), "--output-dir", str(emu)]) == 0
    assert AutoModelForSequenceClassification.from_pretrained(emu).config.num_hidden_layers == 4
    rng = random.Random(0)
    rows = [{"text": t, "label": ["x", "y", "z"][int(t.split()[0][1:]) % 3]}
            for t in word_texts(80, seed=rng.randrange(100))]
    data = tmp_path / "d.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    out_json = tmp_path / "table.json"
    code = main(["evaluate", "--model", str(model), "--emulator", str(emu), "--data", str(data),
                 "--batch-size", "8", "--json", str(out_json)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    table = json.loads(out_json.read_text())
    assert list(table["rows"]) == ["linear_probe", "emulator_alone", "plug_in", "full_lora",
                                   "full_ft"]
    assert all(0.0 <= v <= 1.0 for v in table["rows"].values())
    assert table["eval_examples"] == 16 and table["train_examples"] == 64
    assert table["verbatim_fraction"] == pytest.approx(table["emulator_size_fraction"])
    assert 0.5 < table["emulator_size_fraction"] < 1.0
    assert "| plug_in |" in printed
    assert (emu / LAYOUT_FILENAME).is_file()


def test_evaluate_causal_lm_perplexity(tmp_path: Path) -> None:
    model = _save(tmp_path, "gpt2", "causal-lm")
    emu = tmp_path / "emu"
    assert main(["build", "--model", str(model), "--output-dir", str(emu)]) == 0
    data = tmp_path / "lm.txt"
    data.write_text("\n".join(word_texts(40, seed=7)) + "\n")
    public = tmp_path / "public.txt"
    public.write_text("\n".join(word_texts(40, seed=8)) + "\n")
    out_json = tmp_path / "t.json"
    assert main(["evaluate", "--model", str(model), "--emulator", str(emu), "--data", str(data),
                 "--rows", "emulator_alone", "plug_in", "--batch-size", "8", "--refine-steps", "3",
                 "--public-text", str(public), "--json", str(out_json)]) == 0
    table = json.loads(out_json.read_text())
    assert table["metric"] == "perplexity"
    assert list(table["rows"]) == ["emulator_alone", "plug_in", "plug_in_refined"]
    assert all(1.0 < v < 10 * 128 for v in table["rows"].values())


def test_evaluate_causal_lm_default_rows_and_samples(tmp_path: Path) -> None:
    """The causal-LM table: the untouched model and emulator beside the tuned rows, and greedy samples
    (with the KV cache, on the renumbered emulator blocks) from prompts cut at the gloss's colon."""
    model = _save(tmp_path, "llama", "causal-lm")
    emu = tmp_path / "emu"
    assert main(["build", "--model", str(model), "--output-dir", str(emu), "--keep", "1"]) == 0
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i}: {t}"}) + "\n" for i, t in enumerate(word_texts(48, 3))))
    out_json = tmp_path / "t.json"
    assert main(["evaluate", "--model", str(model), "--emulator", str(emu), "--data", str(data),
                 "--task", "causal-lm", "--batch-size", "8", "--samples", "2", "--json", str(out_json)]) == 0
    table = json.loads(out_json.read_text())
    rows = ["zero_shot", "emulator_untuned", "emulator_alone", "plug_in", "full_lora", "full_ft"]
    assert list(table["rows"]) == rows
    assert table["rows"]["zero_shot"] != table["rows"]["emulator_untuned"]  # 3 of 6 blocks dropped
    samples = table["notes"]["samples"]
    assert list(samples) == rows and all(len(texts) == 2 for texts in samples.values())
    assert all(text.startswith("w") and ":" in text.split()[0] for texts in samples.values() for text in texts)


def test_evaluate_reads_data_as_clients_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labelled data goes through localio.data: a row without a label is one line naming the file and line."""
    model = _save(tmp_path, "bert", "classification")
    emu = tmp_path / "emu"
    assert main(["build", "--model", str(model), "--output-dir", str(emu)]) == 0
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "w1 w2", "label": "x"}) + "\n" + json.dumps({"text": "w3 w4"}) + "\n")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--emulator", str(emu), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedsite-emulator: error: {data}:2: missing 'label'"
