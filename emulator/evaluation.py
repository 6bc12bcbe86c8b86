"""The offsite evaluation table: how good is a tuned adapter, on the emulator and plugged in.

For classification (a JSONL of ``{"text", "label"}``) every row is trained on
the *same* examples, so the numbers compare methods, not data:

- ``linear_probe``: the task head trained on the frozen full model;
- ``emulator_alone``: adapter blocks + head trained on the emulator, evaluated there;
- ``plug_in``: that tuned adapter and head plugged into the full model;
- ``full_lora``: peft LoRA (r=8 on the registry's ``lora_targets``) + head, on the full model;
- ``full_ft``: every parameter of the full model trained.

For a causal LM (a JSONL or text file of ``{"text"}``) the same rows report
perplexity (no head, so no probe). Beside the quality numbers the table
reports what leaves the coordinator: the emulator's size and the fraction of
the full model's parameters it carries byte-identical (see
:func:`emulator.exposure.exposure`).

The training loop here is a small, deterministic reference trainer (AdamW,
linear warm-up and decay, a separate learning rate for the fresh head); it is
what the experiments in ``experiments/offsite/`` use, not the federated
client's trainer (that one is edge code, with DP and logical batches). Data,
batches and scores are the shared ones: files are read as a client reads its
data (:mod:`localio.data`), tokenized and batched by :mod:`emulator.batching`,
and scored as the coordinator's validation scores (:func:`emulator.tasks.evaluate`).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.adapter import adapter_lora_config, adapter_parameter_names, head_parameter_names, plug_in
from emulator.architectures import spec_for
from emulator.batching import Encoded, collate, pad_id_of, shuffled_batches
from emulator.exposure import exposure
from emulator.layout import EmulatorLayout
from emulator.progress import StepProgress
from emulator.refine import RefineConfig, generate_texts, refine_plug_in, refinement_teacher
from emulator.tasks import EncodedExamples, evaluate

log = logging.getLogger("fedsite.evaluate")


class EvaluationDataError(ValueError):
    """A data file the evaluation cannot use."""


# ---------------------------------------------------------------------------
# Data (read with localio.data.read_examples, tokenized with emulator.batching.encode)


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices of ``range(n)`` drawn without replacement (all, shuffled, if None)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order if limit is None else order[: min(limit, n)]


# ---------------------------------------------------------------------------
# Training and metrics


@dataclass
class TrainConfig:
    """One reference training run: epochs over the examples, AdamW, linear schedule."""

    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-4  # body (adapter blocks, LoRA factors or full model)
    head_lr: float = 1e-3  # freshly initialised task head
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06
    seed: int = 0
    max_grad_norm: float = 1.0


def train(
    model: nn.Module,
    body: Sequence[nn.Parameter],
    head: Sequence[nn.Parameter],
    data: Encoded,
    config: TrainConfig,
    *,
    pad_id: int,
    causal_lm: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``body`` and ``head`` parameters (everything else frozen); returns the losses."""
    trainable = {id(p) for p in [*body, *head]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    groups: list[dict[str, Any]] = [g for g in ({"params": list(body), "lr": config.lr},
                          {"params": list(head), "lr": config.head_lr}) if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps = max(1, int(config.epochs * len(data) // config.batch_size))
    warm = int(config.warmup_fraction * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    torch.manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    bar = StepProgress(desc, steps, enabled=progress, log=log)
    for index in shuffled_batches(len(data), config.batch_size, config.seed, steps):
        batch = collate(data, index, pad_id)
        if causal_lm:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.step(loss=losses[-1])
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def _examples(data: Encoded, pad_id: int, task: str) -> EncodedExamples:
    """The reference trainer's examples as the shared evaluation (:func:`emulator.tasks.evaluate`) takes them."""
    return EncodedExamples(input_ids=data.input_ids, labels=data.labels, pad_id=pad_id, task=task)


def accuracy(model: nn.Module, data: Encoded, *, pad_id: int, batch_size: int = 128) -> float:
    """Accuracy as the coordinator's validation measures it."""
    if data.labels is None:
        raise EvaluationDataError("accuracy needs labelled data")
    return evaluate(model, _examples(data, pad_id, "classification"), batch_size=batch_size)["val_accuracy"]


def perplexity(model: nn.Module, data: Encoded, *, pad_id: int, batch_size: int = 32) -> float:
    """exp of the mean next-token loss over all predicted tokens, as the coordinator's validation measures it."""
    return evaluate(model, _examples(data, pad_id, "causal-lm"), batch_size=batch_size)["val_perplexity"]


# ---------------------------------------------------------------------------
# The methods


def _params(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in names if n in named]


def head_params(model: PreTrainedModel) -> list[nn.Parameter]:
    return _params(model, head_parameter_names(model))


def tune_adapter(
    emulator: PreTrainedModel,
    layout: EmulatorLayout,
    data: Encoded,
    config: TrainConfig,
    *,
    pad_id: int,
    causal_lm: bool,
    lora_r: int = 0,
    lora_targets: str | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, dict[str, Tensor]]:
    """Train the adapter (+ head) on a copy of the emulator, as a client would.

    ``lora_r > 0`` trains LoRA factors on the adapter blocks instead of the
    blocks themselves and merges them afterwards. Returns the tuned emulator
    and the emulator-named adapter(+head) state that plug-in takes.
    """
    emu = copy.deepcopy(emulator)
    names = adapter_parameter_names(emu, layout, emulator=True)
    heads = [] if causal_lm else head_parameter_names(emu)
    if lora_r > 0:
        wrapped = get_peft_model(emu, adapter_lora_config(emu, layout, r=lora_r,
                                                          target_modules=lora_targets))
        lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
        head = _params(emu, heads)
        train(wrapped, lora, head, data, config, pad_id=pad_id, causal_lm=causal_lm,
              desc="adapter-lora", progress=progress)
        emu = cast(PreTrainedModel, wrapped.merge_and_unload())
    else:
        train(emu, _params(emu, names), _params(emu, heads), data, config, pad_id=pad_id,
              causal_lm=causal_lm, desc="adapter", progress=progress)
    state = emu.state_dict()
    return emu, {n: state[n].clone() for n in [*names, *heads]}


def full_lora(
    full: PreTrainedModel, data: Encoded, config: TrainConfig, *, pad_id: int,
    causal_lm: bool, r: int = 8, progress: bool = True,
) -> PreTrainedModel:
    """peft LoRA r on the registry's lora_targets of every block, + head; merged."""
    model = copy.deepcopy(full)
    spec = spec_for(model)
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                      target_modules=list(spec.lora_targets))
    wrapped = get_peft_model(model, lcfg)
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    head = [] if causal_lm else head_params(model)
    train(wrapped, lora, head, data, config, pad_id=pad_id, causal_lm=causal_lm,
          desc="full-lora", progress=progress)
    return cast(PreTrainedModel, wrapped.merge_and_unload())


def full_ft(
    full: PreTrainedModel, data: Encoded, config: TrainConfig, *, pad_id: int,
    causal_lm: bool, progress: bool = True,
) -> PreTrainedModel:
    model = copy.deepcopy(full)
    head = [] if causal_lm else head_params(model)
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    train(model, body, head, data, config, pad_id=pad_id, causal_lm=causal_lm,
          desc="full-ft", progress=progress)
    return model


def linear_probe(
    full: PreTrainedModel, data: Encoded, config: TrainConfig, *, pad_id: int,
    progress: bool = True,
) -> PreTrainedModel:
    model = copy.deepcopy(full)
    train(model, [], head_params(model), data, config, pad_id=pad_id, desc="probe",
          progress=progress)
    return model


def partial_ft(
    full: PreTrainedModel, layout: EmulatorLayout, data: Encoded, config: TrainConfig, *,
    pad_id: int, causal_lm: bool, progress: bool = True,
) -> PreTrainedModel:
    """The adapter blocks (+ head) trained directly on the full model: plug-in's ceiling
    when the emulator were perfect."""
    model = copy.deepcopy(full)
    names = adapter_parameter_names(model, layout, emulator=False)
    head = [] if causal_lm else head_params(model)
    train(model, _params(model, names), head, data, config, pad_id=pad_id,
          causal_lm=causal_lm, desc="adapter-on-full", progress=progress)
    return model


# ---------------------------------------------------------------------------
# The table


ALL_ROWS = ("linear_probe", "emulator_alone", "plug_in", "full_lora", "full_ft")
# the causal-LM table also scores the models before any tuning: the full model (zero-shot) and the emulator
CAUSAL_ROWS = ("zero_shot", "emulator_untuned", "emulator_alone", "plug_in", "full_lora", "full_ft")
EXTRA_ROWS = ("zero_shot", "emulator_untuned", "adapter_on_full", "untuned_full")
SAMPLE_TOKENS = 24


def prompt_of(text: str) -> str:
    """The part of an evaluation text a sample starts from: up to ``": "`` (a WordNet gloss's lemma), else
    its first four words."""
    head, sep, _ = text.partition(": ")
    return head + sep.rstrip() if sep else " ".join(text.split()[:4])


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     max_new_tokens: int = SAMPLE_TOKENS) -> list[str]:
    """Greedy continuations (no repeated trigram), with the KV cache on: what a reader of RESULTS.md sees."""
    model.eval()
    out: list[str] = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, no_repeat_ngram_size=3,
                             pad_token_id=pad_id_of(tokenizer), use_cache=True)  # type: ignore[operator]
        out.append(prompt + str(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    return out


@dataclass
class EvaluationTable:
    task: str  # "classification" | "causal-lm"
    metric: str  # "accuracy" | "perplexity"
    rows: dict[str, float]
    train_examples: int
    eval_examples: int
    emulator_size_fraction: float
    verbatim_fraction: float
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        lines = [f"| method | {self.metric} |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.rows.items()]
        for row, texts in self.notes.get("samples", {}).items():
            lines += ["", f"samples, {row}:", *[f"  - {text!r}" for text in texts]]
        lines += [
            "",
            f"- train examples: {self.train_examples}; evaluation examples: {self.eval_examples}",
            f"- emulator size: {self.emulator_size_fraction:.3f} of the full model's parameters",
            f"- leaves the coordinator verbatim in the emulator: {self.verbatim_fraction:.3f}"
            " of the full model's parameters",
        ]
        return "\n".join(lines)


def evaluate_offsite(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    layout: EmulatorLayout,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Encoded,
    eval_data: Encoded,
    config: TrainConfig,
    *,
    causal_lm: bool,
    rows: Sequence[str] = ALL_ROWS,
    adapter_config: TrainConfig | None = None,
    full_ft_config: TrainConfig | None = None,
    lora_config: TrainConfig | None = None,
    adapter_lora_r: int = 0,
    adapter_lora_targets: str | None = None,
    progress: bool = True,
    refine: RefineConfig | None = None,
    public_texts: Sequence[str] = (),
    sample_prompts: Sequence[str] = (),
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> EvaluationTable:
    """Train each requested row on ``train_data`` and score it on ``eval_data``.

    ``full`` and ``emulator`` must share the same (fresh) task head for
    classification, so every row starts from the same point. With ``refine``
    (an :class:`emulator.refine.RefineConfig`) and ``public_texts``, the plug-in
    is also refined against the tuned emulator (or its mixture with the plug-in) and scored as
    ``plug_in_refined``; with ``refine.text == "generated"`` the teacher writes the texts itself.
    With ``sample_prompts`` (causal LMs) every scored model also continues each
    prompt greedily; the texts land in ``notes["samples"]`` by row. ``on_row`` hears
    the scores so far after every row (long runs keep what they measured).
    """
    pad_id = pad_id_of(tokenizer)
    samples: dict[str, list[str]] = {}

    def score(model: nn.Module, row: str) -> float:
        if causal_lm:
            if sample_prompts:
                samples[row] = generate_samples(model, tokenizer, sample_prompts)
            return perplexity(model, eval_data, pad_id=pad_id)
        return accuracy(model, eval_data, pad_id=pad_id)

    out: dict[str, float] = {}
    seconds: dict[str, float] = {}
    kw: dict[str, Any] = {"pad_id": pad_id, "progress": progress}
    for row in rows:
        start = time.perf_counter()
        if row == "linear_probe":
            if causal_lm:
                continue
            out[row] = score(linear_probe(full, train_data, config, **kw), row)
        elif row == "emulator_alone":
            tuned, state = tune_adapter(emulator, layout, train_data, adapter_config or config,
                                        causal_lm=causal_lm, lora_r=adapter_lora_r,
                                        lora_targets=adapter_lora_targets, **kw)
            out[row] = score(tuned, row)
            wants_refined = refine is not None and refine.steps > 0
            plugged = plug_in(full, state, layout) if "plug_in" in rows or wants_refined else None
            if "plug_in" in rows and plugged is not None:
                out["plug_in"] = score(plugged, "plug_in")
            if wants_refined and refine is not None and plugged is not None:
                teacher = refinement_teacher(plugged, tuned, refine)
                texts = (generate_texts(teacher, tokenizer, refine, progress=progress)
                         if refine.text == "generated" else public_texts)
                refined, _ = refine_plug_in(plugged, teacher, layout, tokenizer, texts, refine,
                                            progress=progress)
                out["plug_in_refined"] = score(refined, "plug_in_refined")
        elif row == "plug_in":
            continue  # computed with emulator_alone
        elif row == "full_lora":
            out[row] = score(full_lora(full, train_data, lora_config or config,
                                       causal_lm=causal_lm, **kw), row)
        elif row == "full_ft":
            out[row] = score(full_ft(full, train_data, full_ft_config or config,
                                     causal_lm=causal_lm, **kw), row)
        elif row == "adapter_on_full":
            out[row] = score(partial_ft(full, layout, train_data, adapter_config or config,
                                        causal_lm=causal_lm, **kw), row)
        elif row in ("untuned_full", "zero_shot"):
            out[row] = score(full, row)
        elif row == "emulator_untuned":
            out[row] = score(emulator, row)
        else:
            raise ValueError(f"unknown row {row!r}; choose from {[*ALL_ROWS, *EXTRA_ROWS]}")
        seconds[row] = time.perf_counter() - start
        log.info("%s done in %.0fs: %s", row, seconds[row],
                 ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        if on_row is not None:
            on_row(dict(out))
    exp = exposure(full, emulator)
    ordered = {name: out[name] for name in dict.fromkeys([*rows, "plug_in", "plug_in_refined"]) if name in out}
    return EvaluationTable(
        task="causal-lm" if causal_lm else "classification",
        metric="perplexity" if causal_lm else "accuracy",
        rows=ordered,
        train_examples=len(train_data),
        eval_examples=len(eval_data),
        emulator_size_fraction=exp.size_fraction,
        verbatim_fraction=exp.verbatim_fraction,
        seconds=seconds,
        notes={"samples": samples} if samples else {},
    )
