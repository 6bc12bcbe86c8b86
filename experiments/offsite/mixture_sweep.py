"""How good a refinement teacher is: perplexity of the mixture p_plug^(1-w) * p_emulator^w on held-out glosses.

The plug-in refinement (``--refine-emulator-weight``, emulator/refine.py) can at best reach its teacher, so the
teacher's own perplexity says which weight to refine toward. This tunes the adapter on the emulator exactly as
``fedsite-emulator evaluate`` does (same 320 training glosses, same seeded 200 validation glosses, adapter lr
1e-3), plugs it in, and scores the plug-in, the tuned emulator and their mixtures at each weight. Inference only,
a few minutes on one core. Usage (from the repository root, after run_smollm2_refine.sh's build):

    .venv/bin/python experiments/offsite/mixture_sweep.py --emulator /tmp/fedsite-smollm2-cache/emu-kl-d800
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from emulator.adapter import plug_in  # noqa: E402
from emulator.batching import Encoded, collate, encode, pad_id_of  # noqa: E402
from emulator.cli import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from emulator.distill import read_text_corpus  # noqa: E402
from emulator.evaluation import TrainConfig, perplexity, subsample, tune_adapter  # noqa: E402
from emulator.layout import load_layout_checked  # noqa: E402
from emulator.refine import MixtureTeacher  # noqa: E402

DATA = REPO / "coordinator" / "examples" / "data"


@torch.no_grad()
def mixture_perplexity(teacher: MixtureTeacher, data: Encoded, pad_id: int) -> float:
    """exp of the mean next-token loss over every predicted (unpadded) token, as ``perplexity`` counts it."""
    total, tokens = 0.0, 0
    for start in range(0, len(data), 32):
        batch = collate(data, list(range(start, min(start + 32, len(data)))), pad_id)
        log_probs = teacher(**batch).logits[:, :-1]
        target, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
        picked = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total -= float(picked[mask].sum())
        tokens += int(mask.sum())
    return math.exp(total / tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_path = resolve_model_path("smollm2")
    tok = load_tokenizer(args.emulator, model_path)
    torch.manual_seed(args.seed)  # as `evaluate` seeds before tuning
    texts = read_text_corpus(str(DATA / "wordnet_supersense.train.jsonl.gz"))
    held = read_text_corpus(str(DATA / "wordnet_supersense.validation.jsonl.gz"))
    train = encode(tok, [texts[i] for i in subsample(len(texts), None, args.seed)[:320]], 48)
    held_data = encode(tok, [held[i] for i in sorted(subsample(len(held), 200, args.seed + 1))], 48)
    full, emulator = load_model(model_path, "causal-lm"), load_model(args.emulator, "causal-lm")
    layout = load_layout_checked(args.emulator, emulator)
    pad = pad_id_of(tok)
    tuned, state = tune_adapter(emulator, layout, train, TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=args.seed),
                                pad_id=pad, causal_lm=True, progress=False)
    plugged = plug_in(full, state, layout)
    rows = {"plug_in": perplexity(plugged, held_data, pad_id=pad),
            "emulator_alone": perplexity(tuned, held_data, pad_id=pad)}
    for w in args.weights:
        rows[f"mixture w={w}"] = mixture_perplexity(MixtureTeacher(plugged, tuned, w), held_data, pad)
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"emulator": str(args.emulator), "seed": args.seed, "perplexity": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
