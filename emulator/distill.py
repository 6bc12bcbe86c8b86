"""Distil an emulator's kept middle blocks toward the full model's middle.

Layer drop leaves the emulator's middle a crude stand-in for the full
model's; the adapter a client tunes against it then meets a different middle
when plugged back in. Distillation (coordinator-side, on public text, before
the emulator is distributed) trains only the kept middle blocks so that the
emulator's middle output matches the full model's on the same input:

    loss = lm_weight * LM loss (causal LMs, optional)
         + hidden_weight * mean_tokens( mean_dim( ((h_full - h_emu) / rms(h_full))^2 ) )

where h is the hidden state entering the first top adapter block and
rms(h_full) is taken per token over the hidden dimension (padding excluded),
so the loss is scale-free across models and layers. A Llama-family residual
stream is dominated by one or two "massive activation" channels (SmolLM2:
one channel holds ~95 % of the energy entering its top blocks), so that
per-token scale is mostly the outlier's; ``hidden_metric="channel"`` divides
each channel's error by that channel's rms over the batch's real tokens
instead, so every channel counts alike (measured worse on SmolLM2: the other
channels end no closer, and matching the massive one less exactly breaks the
top blocks; experiments/offsite/RESULTS.md, fourth pass).
``kl_weight`` > 0 adds KL(teacher || student) of the next-token
distributions (causal LMs; the emulator's top blocks and head are the full
model's, frozen): the output the top blocks make of the middle, not only
the middle itself (on SmolLM2 it took the plug-in's perplexity from 88 to 75). With
``objective="segments"`` the output of every kept middle block is also
matched to the full model's hidden state at the end of the run of blocks it
replaces. With ``input_noise`` > 0 the hidden state entering the middle gets
the same Gaussian perturbation (std ``input_noise`` x its per-token rms) in
teacher and student, so the kept middle learns to match the full middle
*around* the untuned bottom blocks' outputs rather than only at them: the
adapter the clients tune moves those outputs, and the plugged-in model then
meets the full middle there.

Runs are resumable: every ``checkpoint_every`` steps the middle blocks and
the AdamW state go to ``distill_state.safetensors`` (never pickle) with the
step in ``distill_state.json``, both written atomically; the data order and
dropout seeds depend only on (seed, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.architectures import transformer_blocks
from emulator.batching import Encoded, collate, encode, pad_id_of, shuffled_batches
from emulator.layout import EmulatorError, EmulatorLayout
from emulator.progress import StepProgress
from emulator.settings import HIDDEN_METRICS, OffsiteSettings
from localio.data import open_text

STATE_FILE = "distill_state.safetensors"
META_FILE = "distill_state.json"
OBJECTIVES = ("middle", "segments")


class DistillError(ValueError):
    """A user-caused problem with a distillation run (bad data, mismatched checkpoint)."""


def read_text_corpus(path: str | Path, limit: int | None = None) -> list[str]:
    """Lines of a text file, or the ``"text"`` field of a JSONL file (either may be .gz)."""
    if not Path(path).is_file():
        raise DistillError(f"{path}: no such file")
    texts: list[str] = []
    with open_text(Path(path)) as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DistillError(f"{path}:{lineno}: line looks like JSON but is not: {exc}") from exc
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DistillError(f"{path}:{lineno}: JSON line without a string 'text' field")
                texts.append(row["text"])
            else:
                texts.append(line)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise DistillError(f"{path}: no text")
    return texts


@dataclass
class DistillConfig:
    """One distillation run; what the job file sets (``[offsite] distill_*``) defaults as it does there."""

    steps: int = 600
    batch_size: int = OffsiteSettings.distill_batch_size
    lr: float = OffsiteSettings.distill_lr
    warmup_fraction: float = 0.05
    max_length: int = 64
    hidden_weight: float = 1.0  # λ
    lm_weight: float = 0.0  # causal LMs only
    objective: str = "middle"  # "middle" | "segments"
    input_noise: float = OffsiteSettings.distill_input_noise  # relative std of the middle's input perturbation
    hidden_metric: str = OffsiteSettings.distill_hidden_metric  # "token" | "channel": the error's scale
    kl_weight: float = OffsiteSettings.distill_kl_weight  # causal LMs: KL(teacher || student), next tokens
    seed: int = 0
    checkpoint_every: int = 100
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DistillError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.input_noise <= 10.0:
            raise DistillError(f"input_noise must be in [0, 10], got {self.input_noise}")
        if self.hidden_metric not in HIDDEN_METRICS:
            raise DistillError(f"hidden_metric must be one of {HIDDEN_METRICS}, got {self.hidden_metric!r}")
        if not 0.0 <= self.kl_weight <= 100.0:
            raise DistillError(f"kl_weight must be in [0, 100], got {self.kl_weight}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise DistillError("steps >= 0, batch_size >= 1 and lr > 0 are required")


@dataclass
class DistillResult:
    steps_done: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


# ---------------------------------------------------------------------------
# Capturing hidden states


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted states are captured."""


def _output_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _capture(model: PreTrainedModel, block_ids: Sequence[int], stop: bool) -> Iterator[dict[int, Tensor]]:
    """Record the output of the given blocks; raise _Stop after the last one if ``stop``."""
    blocks = transformer_blocks(model)
    seen: dict[int, Tensor] = {}
    last = max(block_ids)
    handles = []

    def make(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen[i] = _output_tensor(output)
            if stop and i == last:
                raise _Stop

        return hook

    for i in block_ids:
        handles.append(blocks[i].register_forward_hook(make(i)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _run(model: PreTrainedModel, batch: dict[str, Tensor], block_ids: Sequence[int],
         stop: bool) -> tuple[dict[int, Tensor], Any]:
    with _capture(model, block_ids, stop) as seen:
        try:
            out = model(**batch)
        except _Stop:
            out = None
    return seen, out


def targets(layout: EmulatorLayout, objective: str) -> list[tuple[int, int]]:
    """(emulator block, full block) pairs whose outputs are matched.

    "middle": the last middle block of each. "segments": each kept block j
    against the full block just before the next kept block (the run of
    full blocks that j stands in for ends there).
    """
    if not layout.kept_middle:
        raise DistillError("the emulator keeps no middle block: nothing to distil")
    emu_ids = layout.middle_emulator_indices
    last_full_middle = layout.adapter_top[0] - 1 if layout.adapter_top else \
        layout.num_full_blocks - 1
    if objective == "middle":
        return [(emu_ids[-1], last_full_middle)]
    ends = [nxt - 1 for nxt in layout.kept_middle[1:]] + [last_full_middle]
    return list(zip(emu_ids, ends, strict=True))


@contextmanager
def _perturbed_middle_input(full: PreTrainedModel, emulator: PreTrainedModel, layout: EmulatorLayout,
                            relative_std: float, generator: torch.Generator) -> Iterator[None]:
    """Add one noise draw to the input of the first middle block, the same in teacher and student.

    The teacher runs first (see _losses): its hook draws the noise from the
    input's shape and per-token rms, the student's hook adds the same tensor.
    """
    if relative_std <= 0 or not layout.kept_middle:
        yield
        return
    first_full = layout.adapter_bottom[-1] + 1 if layout.adapter_bottom else 0
    first_emu = len(layout.adapter_bottom)
    drawn: list[Tensor] = []

    def perturb(args: tuple[Any, ...], kwargs: dict[str, Any], teacher: bool) -> tuple[Any, Any]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if teacher:
            rms = hidden.pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype) * rms * relative_std
            drawn[:] = [noise.to(hidden.device)]
        hidden = hidden + drawn[0]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handles = [
        transformer_blocks(full)[first_full].register_forward_pre_hook(
            lambda _m, a, k: perturb(a, k, teacher=True), with_kwargs=True),
        transformer_blocks(emulator)[first_emu].register_forward_pre_hook(
            lambda _m, a, k: perturb(a, k, teacher=False), with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def normalized_distance(h_full: Tensor, h_emu: Tensor, mask: Tensor) -> Tensor:
    """mean over real tokens of mean_dim(((h_full - h_emu) / rms(h_full))^2)."""
    rms = h_full.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    per_token = ((h_full - h_emu) / rms).pow(2).mean(-1)  # [batch, seq]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def channel_distance(h_full: Tensor, h_emu: Tensor, mask: Tensor) -> Tensor:
    """mean over real tokens and channels of ((h_full - h_emu) / rms_c(h_full))^2.

    rms_c is channel c's rms over the batch's real tokens, so a massive-activation
    channel's error is measured against its own scale and cannot drown the rest.
    """
    m = mask.to(h_full.dtype).unsqueeze(-1)  # [batch, seq, 1]
    count = m.sum().clamp_min(1.0)
    rms = ((h_full.pow(2) * m).sum((0, 1)) / count).sqrt().clamp_min(1e-6)  # [dim]
    per_token = ((h_full - h_emu) / rms).pow(2).mean(-1)
    return (per_token * m.squeeze(-1)).sum() / count


DISTANCES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": normalized_distance, "channel": channel_distance}


def next_token_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


@dataclass
class _Losses:
    hidden: Tensor
    lm: Tensor | None = None
    kl: Tensor | None = None


def _losses(full: PreTrainedModel, emulator: PreTrainedModel, batch: dict[str, Tensor],
            pairs: Sequence[tuple[int, int]], config: DistillConfig) -> _Losses:
    """The hidden-state distance (config.hidden_metric) and, if weighted, the LM and KL terms.

    A forward pass stops at the last matched block unless an output-level term needs the logits.
    """
    wants_kl = config.kl_weight > 0
    with torch.no_grad():
        teacher, t_out = _run(full, batch, [f for _, f in pairs], stop=not wants_kl)
    student_batch = batch
    if config.lm_weight > 0:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        student_batch = {**batch, "labels": labels}
    student, out = _run(emulator, student_batch, [e for e, _ in pairs],
                        stop=not (wants_kl or config.lm_weight > 0))
    distance = DISTANCES[config.hidden_metric]
    hidden = torch.stack([
        distance(teacher[f], student[e], batch["attention_mask"]) for e, f in pairs
    ]).mean()
    result = _Losses(hidden)
    if config.lm_weight > 0 and out is not None:
        result.lm = out.loss
    if wants_kl and t_out is not None and out is not None:
        result.kl = next_token_kl(t_out.logits, out.logits, batch["attention_mask"])
    return result


@torch.no_grad()
def hidden_distance(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    layout: EmulatorLayout,
    data: Encoded,
    *,
    pad_id: int,
    batch_size: int = 64,
) -> float:
    """Mean normalized distance between full and emulator middle outputs on ``data``."""
    full.eval()
    emulator.eval()
    pairs = targets(layout, "middle")
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        batch = collate(data, index, pad_id)
        batch.pop("labels", None)
        loss = _losses(full, emulator, batch, pairs, DistillConfig()).hidden
        total += float(loss) * len(index)
        count += len(index)
    return total / count


# ---------------------------------------------------------------------------
# Checkpoints


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_checkpoint(directory: Path, step: int, params: dict[str, nn.Parameter],
                     opt: torch.optim.Optimizer, config: DistillConfig,
                     losses: list[float]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{index[id(p)]}.{key}"] = value.detach().contiguous()
    _atomic_write(directory / STATE_FILE, lambda tmp: save_file(tensors, str(tmp)))
    meta = {"step": step, "config": asdict(config), "losses": losses}

    def write_meta(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta), encoding="utf-8")

    _atomic_write(directory / META_FILE, write_meta)


def _load_checkpoint(directory: Path, params: dict[str, nn.Parameter],
                     opt: torch.optim.Optimizer, config: DistillConfig) -> tuple[int, list[float]]:
    meta_path, state_path = directory / META_FILE, directory / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    saved = meta.get("config", {})
    defaults = {"input_noise": 0.0, "hidden_metric": "token", "kl_weight": 0.0}  # older checkpoints
    for key in ("batch_size", "seed", "objective", "max_length", "input_noise", "hidden_metric", "kl_weight"):
        if saved.get(key, defaults.get(key)) != getattr(config, key):
            raise DistillError(
                f"{directory}: checkpoint was made with {key}={saved.get(key)!r}, "
                f"this run has {getattr(config, key)!r}; use a fresh checkpoint directory"
            )
    tensors = load_file(str(state_path))
    with torch.no_grad():
        for n, p in params.items():
            if f"param.{n}" not in tensors:
                raise DistillError(f"{directory}: checkpoint lacks {n}; not this emulator's")
            p.copy_(tensors[f"param.{n}"])
    for n, p in params.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                 if k.startswith(f"opt.{n}.") and k.count(".") == n.count(".") + 2}
        if state:
            opt.state[p] = state
    return int(meta["step"]), list(meta.get("losses", []))


# ---------------------------------------------------------------------------
# The run


def middle_parameters(emulator: PreTrainedModel, layout: EmulatorLayout) -> dict[str, nn.Parameter]:
    """The kept middle blocks' parameters, by state-dict name (what distillation trains)."""
    blocks = transformer_blocks(emulator)
    out: dict[str, nn.Parameter] = {}
    for i in layout.middle_emulator_indices:
        for n, p in blocks[i].named_parameters():
            out[f"{layout.blocks_prefix}.{i}.{n}"] = p
    return out


def distill(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    layout: EmulatorLayout,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: DistillConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train ``emulator``'s kept middle blocks in place; ``full`` is not changed.

    With ``checkpoint_dir`` the run resumes from the last checkpoint there and
    checkpoints every ``config.checkpoint_every`` steps and at the end.
    ``progress`` shows a bar on a terminal and log lines elsewhere; ``report``
    gets a one-line status after every step (see :class:`StepProgress`).
    """
    if len(layout.emulator_blocks) != len(transformer_blocks(emulator)):
        raise EmulatorError("the layout does not describe this emulator")
    if (config.lm_weight > 0 or config.kl_weight > 0) and emulator.get_output_embeddings() is None:
        raise DistillError("lm_weight or kl_weight > 0 needs a causal-LM emulator")
    data = encode(tokenizer, texts, config.max_length)
    pad_id = pad_id_of(tokenizer)
    pairs = targets(layout, config.objective)
    params = middle_parameters(emulator, layout)
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    for p in full.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses = (0, []) if ckpt is None else _load_checkpoint(ckpt, params, opt, config)
    warm = max(1, int(config.warmup_fraction * config.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return config.lr * (step + 1) / warm
        progress_ = (step - warm) / max(1, config.steps - warm)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    full.eval()
    emulator.eval()  # no dropout: the student matches a deterministic function
    order = shuffled_batches(len(data), config.batch_size, config.seed)
    for _ in range(start):
        next(order)
    bar = StepProgress("distilling the emulator", config.steps, initial=start, enabled=progress,
                       log=logging.getLogger("fedsite.distill"), report=report)
    for step in range(start, config.steps):
        batch = collate(data, next(order), pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        noise_seed = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # resumable: depends on step
        with _perturbed_middle_input(full, emulator, layout, config.input_noise, noise_seed):
            terms = _losses(full, emulator, batch, pairs, config)
        loss = terms.hidden
        total = config.hidden_weight * loss
        if terms.lm is not None:
            total = total + config.lm_weight * terms.lm
        if terms.kl is not None:
            total = total + config.kl_weight * terms.kl
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        bar.step(hidden_loss=losses[-1], **({} if terms.kl is None else {"kl": float(terms.kl.detach())}))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if ckpt is not None and ((step + 1) % config.checkpoint_every == 0
                                 or step + 1 == config.steps):
            _save_checkpoint(ckpt, step + 1, params, opt, config, losses)
    bar.close()
    for p in emulator.parameters():
        p.requires_grad_(False)
    layout.distilled = layout.distilled or config.steps > start
    return DistillResult(steps_done=config.steps, losses=losses, resumed_from=start)
