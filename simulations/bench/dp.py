"""Benchmark: what DP-SGD costs a client, measured side by side in one run.

It measures fedsite's own client training (``client.trainer.train_steps``, the code a
client runs) on the real MiniLM with LoRA and mean pooling (the default job's model), on
real WordNet glosses shipped in this repository, in these arms:

* ``plain@B``: ordinary AdamW steps at logical batch B, computed in physical chunks;
* ``dp@B``: DP-SGD steps (Opacus per-sample clipping + noise, Poisson sampling) at the
  same logical batch and chunks;
* ``dp@B-whole``: the same DP steps with the logical batch in one physical batch (what
  chunking saves in memory);
* ``dp@16``: the old default's small batch, for the memory comparison.

Arms are interleaved (each repetition runs every arm once) so that load from other
processes hits them alike; reported are the median seconds per logical step and the
spread (min..max over repetitions), the peak of live tensor memory during one step
(torch profiler, CPU allocations), and ratios. It also times the per-round DP set-up
a client pays besides its steps (calibrating σ to a target ε, ``make_private``, the
ε of the ledger afterwards).

    HF_HUB_OFFLINE=1 python -m simulations.bench.dp [--batch 1024] [--physical 64] [--steps 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from client.trainer import TrainSettings, train_steps
from emulator.lora import add_lora
from emulator.models import embedded_model_path, load_model, load_tokenizer
from emulator.settings import LoraSettings
from emulator.tasks import EncodedExamples, encode
from localio.data import read_examples
from privacy.accounting import PrivacyLedger, plan_noise_multiplier
from privacy.local_dp import make_private, unwrap

DATA = Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "data" / "wordnet_supersense.train.jsonl.gz"


def build(examples: int, max_length: int) -> tuple[torch.nn.Module, EncodedExamples]:
    rows = read_examples(DATA, need_label=True)
    labels = sorted({r.label for r in rows if r.label})
    rows = random.Random(0).sample(rows, examples)
    folder = embedded_model_path()
    base = load_model(folder, "classification", labels, seed=0, pooling="mean")
    model = add_lora(base, LoraSettings(r=8, alpha=16), task="classification", seed=0)
    data = encode(rows, load_tokenizer(folder), task="classification", max_length=max_length,
                  label2id={label: i for i, label in enumerate(labels)})
    return model, data


def step_memory(run: Callable[[], None]) -> int:
    """Peak of live tensor bytes during ``run``, from the profiler's CPU allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


class Arm:
    def __init__(self, name: str, model: torch.nn.Module, data: EncodedExamples, batch: int, physical: int,
                 dp: bool) -> None:
        self.name, self.model, self.data, self.dp = name, copy.deepcopy(model), data, dp
        self.settings = TrainSettings(local_steps=1, batch_size=batch, lr=1e-3, physical_batch_size=physical)
        self.times: list[float] = []

    def run(self, steps: int) -> float:
        settings = TrainSettings(**{**self.settings.__dict__, "local_steps": steps})
        ledger = PrivacyLedger(None)

        def privatize(model: Any, optimizer: Any, loader: Any) -> Any:
            return make_private(model, optimizer, loader, noise_multiplier=0.7, max_grad_norm=1.0, ledger=ledger,
                                seed=0)

        start = time.perf_counter()
        try:
            train_steps(self.model, self.data, settings, generator=torch.Generator().manual_seed(len(self.times)),
                        privatize=privatize if self.dp else None)
        finally:
            unwrap(self.model)
        return (time.perf_counter() - start) / steps


def round_setup_seconds(model: torch.nn.Module, data: EncodedExamples, batch: int, repeats: int = 5) -> float:
    """What a DP client pays per round besides its steps: σ calibration, make_private, ε afterwards."""
    times = []
    ledger = PrivacyLedger(None)
    for r in range(repeats):
        start = time.perf_counter()
        sigma, q = plan_noise_multiplier(examples=len(data), batch_size=batch, steps=(repeats - r) * 4,
                                         delta=1e-5, ledger=ledger, target_epsilon=8.0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=data.collate)
        private, _, _ = make_private(model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=1.0,
                                     ledger=ledger, seed=0)
        unwrap(private)
        ledger.record(noise_multiplier=sigma, sample_rate=q, steps=4)
        ledger.epsilon(1e-5)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="logical batch of the large-batch arms")
    parser.add_argument("--physical", type=int, default=64, help="physical chunk of the chunked arms")
    parser.add_argument("--steps", type=int, default=2, help="logical steps per arm per repetition")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--examples", type=int, default=9000, help="client data (the default job's ~9,400)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bench.dp: fedsite's client trainer, MiniLM + LoRA r=8 + mean pooling, {args.examples} glosses, "
          f"DP-SGD vs plain at logical batch {args.batch} in chunks of {args.physical}; {args.reps} interleaved "
          f"repetitions of {args.steps} steps, {args.threads} thread(s)")
    model, data = build(args.examples, args.max_length)
    big, chunk = args.batch, args.physical
    arms = [Arm(f"plain@{big}", model, data, big, chunk, dp=False), Arm(f"dp@{big}", model, data, big, chunk, dp=True),
            Arm(f"dp@{big}-whole", model, data, big, big, dp=True), Arm("dp@16", model, data, 16, chunk, dp=True)]
    for arm in arms:  # warm-up: optimizer state, allocator, first-call costs
        arm.run(1)
    for _ in range(args.reps):
        for arm in arms:
            arm.times.append(arm.run(args.steps))
    memory = {arm.name: step_memory(lambda arm=arm: arm.run(1)) for arm in arms}  # type: ignore[misc]
    med = {arm.name: statistics.median(arm.times) for arm in arms}
    figures: dict[str, Any] = {
        "batch": big, "physical": chunk, "examples": len(data), "threads": args.threads, "reps": args.reps,
        "seconds_per_step": {arm.name: {"median": med[arm.name], "min": min(arm.times), "max": max(arm.times)}
                             for arm in arms},
        "peak_mib": {name: peak / 2**20 for name, peak in memory.items()},
        "time_ratio_dp_over_plain": med[f"dp@{big}"] / med[f"plain@{big}"],
        "memory_ratio_dp_over_plain": memory[f"dp@{big}"] / memory[f"plain@{big}"],
        "memory_ratio_dp_whole_over_chunked": memory[f"dp@{big}-whole"] / memory[f"dp@{big}"],
        "memory_ratio_dp_big_over_dp16": memory[f"dp@{big}"] / memory["dp@16"],
        "round_setup_s": round_setup_seconds(copy.deepcopy(model), data, big),
    }
    for arm in arms:
        s = figures["seconds_per_step"][arm.name]
        print(f"  {arm.name:<16} {s['median']:7.2f} s/step ({s['min']:.2f}..{s['max']:.2f})  "
              f"peak {figures['peak_mib'][arm.name]:8.1f} MiB")
    for key in ("time_ratio_dp_over_plain", "memory_ratio_dp_over_plain", "memory_ratio_dp_whole_over_chunked",
                "memory_ratio_dp_big_over_dp16", "round_setup_s"):
        print(f"  {key:<36} {figures[key]:.3g}")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
