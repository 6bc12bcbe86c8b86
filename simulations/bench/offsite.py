"""Client cost on SmolLM2: the offsite client vs full-model LoRA vs full fine-tuning, as ratios.

What an edge client pays per method, on the real 30-block SmolLM2-135M and WordNet glosses
(causal LM):

- ``offsite``: the project's client (``ClientRuntime.train``, the trainer every driver uses) on a real
  offsite job package: the emulator (2+2 adapter blocks, ``--keep`` of the 26 middle blocks);
- ``lora``: the project's client on a real lora job package (r=8 on q/v of all 30 blocks);
- ``full_ft``: every parameter of the full model (fedsite has no federated full FT; the reference);
- ``offsite_bare`` and ``lora_bare``: a bare AdamW loop on the same models and batches, so the gap
  between a method and its bare loop is what the project's client adds.

Time is reported as CPU seconds per step (one torch thread, so the step's cost; other processes on a
shared machine inflate it far less than the wall clock) and as wall seconds.

Each measurement is a fresh process (so peak RSS is that method's alone) that holds only what that
client holds. Methods are interleaved and the whole sweep repeated (``--repeats``): the machine is
shared, so the report gives each method's median with its spread (min-max) and ratios of medians
measured side by side. Beside them, the ideal that counting blocks gives (emulator blocks / full blocks)
and the one that counting multiply-adds per token gives (blocks plus the 49,152-word output layer,
which every method pays in full).

    python -m simulations.bench.offsite [--repeats 3] [--steps 4] [--keep 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("offsite", "lora", "full_ft", "offsite_bare", "lora_bare")
WARMUP = 1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _floor(queue: Any) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    queue.put(_rss_mb())


def _examples(data: str, count: int) -> list[Any]:
    from localio.data import Example, read_examples

    rows = read_examples(data, need_label=False)
    return [Example(text=e.text) for e in rows[:count]]


def _client_worker(method: str, package: str, data: str, batch: int, steps: int, queue: Any) -> None:
    """The project's client: its runtime built from the package, and the trainer call ClientRuntime.train
    makes (one round of ``steps`` local steps, after a warm-up round of one step)."""
    import torch

    from client.runtime import ClientRuntime
    from client.trainer import TrainSettings, data_generator, train_steps
    from emulator.lora import trainable_state

    torch.set_num_threads(1)
    runtime = ClientRuntime.from_package(Path(package), _examples(data, batch * (steps + WARMUP)), state_dir=None)
    trainable_bytes = sum(t.numel() * t.element_size() for t in trainable_state(runtime.model).values())
    train_steps(runtime.model, runtime.examples, TrainSettings(local_steps=WARMUP, batch_size=batch, lr=1e-4),
                generator=data_generator(0, 0, 0))
    cpu = time.process_time()
    result = train_steps(runtime.model, runtime.examples, TrainSettings(local_steps=steps, batch_size=batch, lr=1e-4),
                         generator=data_generator(0, 1, 0))
    queue.put({"peak_mb": _rss_mb(), "step_seconds": result.seconds / steps,
               "cpu_seconds": (time.process_time() - cpu) / steps, "trainable_bytes": trainable_bytes})


def _bare_worker(method: str, folder: str, data: str, batch: int, steps: int, layout_json: str,
                 queue: Any) -> None:
    """A bare AdamW loop on the same model and batches (the reference each client is held to)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emulator.adapter import adapter_parameter_names
    from emulator.layout import EmulatorLayout
    from emulator.tasks import encode

    torch.set_num_threads(1)
    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(method == "full_ft")
    if method == "offsite_bare":
        names = set(adapter_parameter_names(model, EmulatorLayout.from_json(layout_json), emulator=True))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
    elif method == "lora_bare":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    encoded = encode(_examples(data, batch * (steps + WARMUP)), tokenizer, task="causal-lm", max_length=64)
    model.train()
    times, cpu_times = [], []
    for step in range(steps + WARMUP):
        rows = sorted(range(step * batch, (step + 1) * batch), key=lambda i: len(encoded.input_ids[i]))
        inputs = encoded.collate([encoded[i] for i in rows])
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
    queue.put({"peak_mb": _rss_mb(), "step_seconds": sum(times) / len(times),
               "cpu_seconds": sum(cpu_times) / len(cpu_times), "trainable_bytes": trainable_bytes})


def _spawn(target: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _job_table(mode: str, keep: int) -> dict[str, Any]:
    return {"job": {"name": f"bench-{mode}", "mode": mode, "seed": 0},
            "model": {"path": "smollm2", "task": "causal-lm", "max_length": 64},
            "lora": {"r": 8, "alpha": 16}, "offsite": {"adapter_layers": 2, "keep": keep}}


def build_packages(work: Path, keep: int) -> dict[str, Any]:
    """Real job packages (what clients download) for both modes, and the full model's folder."""
    from coordinator.config import parse_job
    from coordinator.job import build_package
    from emulator.models import resolve_model_path

    out: dict[str, Any] = {"full": str(resolve_model_path("smollm2"))}
    for mode in ("offsite", "lora"):
        package = build_package(parse_job(_job_table(mode, keep), work), work / mode)
        out[mode] = {"folder": str(package.folder), "tar_bytes": len(package.blob)}
    return out


def flops_per_token(hidden: int, inter: int, heads: int, kv_heads: int, vocab: int) -> tuple[float, float]:
    """Multiply-adds per token of one block (projections and MLP; attention scores are small at these
    lengths) and of the output layer."""
    head_dim = hidden // heads
    block = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return float(block), float(hidden * vocab)


def ideals(config: Any, emulator_blocks: int) -> dict[str, float]:
    """Time ratios an implementation cannot beat, offsite over LoRA: by block count, and by multiply-adds
    (forward + backward; a frozen block's backward costs one forward, a trained one two)."""
    n = config.num_hidden_layers
    block, head = flops_per_token(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                                  config.num_key_value_heads, config.vocab_size)
    lora = n * block * 2 + head * 2  # forward + input-gradient backward everywhere (LoRA factors are tiny)
    offsite = emulator_blocks * block * 2 + 4 * block + head * 2  # + the adapter's 4 blocks' weight gradients
    full = n * block * 3 + head * 2  # every block trains; the tied output layer also gets its weight gradient
    return {"blocks_offsite_over_lora": emulator_blocks / n, "flops_offsite_over_lora": offsite / lora,
            "flops_offsite_over_full_ft": offsite / (full + head), "flops_lora_over_full_ft": lora / (full + head)}


def run(repeats: int, steps: int, batch: int, keep: int, data: str, methods: tuple[str, ...]) -> dict[str, Any]:
    from transformers import AutoConfig

    from emulator.layout import EmulatorLayout

    floor_mb = _spawn(_floor)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_packages(Path(tmp), keep)
        layout = EmulatorLayout.load(Path(built["offsite"]["folder"]) / "model")
        folders = {"offsite": built["offsite"]["folder"], "lora": built["lora"]["folder"],
                   "offsite_bare": str(Path(built["offsite"]["folder"]) / "model"), "lora_bare": built["full"],
                   "full_ft": built["full"]}
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for rep in range(repeats):
            order = list(methods[rep % len(methods):]) + list(methods[: rep % len(methods)])  # rotate
            for method in order:
                if method in ("offsite", "lora"):
                    r = _spawn(_client_worker, method, folders[method], data, batch, steps)
                else:
                    r = _spawn(_bare_worker, method, folders[method], data, batch, steps, layout.to_json())
                r["memory_mb"] = r["peak_mb"] - floor_mb
                runs[method].append(r)
                print(f"  repeat {rep + 1}/{repeats} {method}: {r['step_seconds']:.2f} s/step "
                      f"({r['cpu_seconds']:.2f} CPU s), {r['memory_mb']:.0f} MB", flush=True)
        full_bytes = sum(f.stat().st_size for f in Path(built["full"]).glob("*.safetensors"))
        emulator_bytes = sum(f.stat().st_size for f in Path(folders["offsite_bare"]).glob("*.safetensors"))
        config = AutoConfig.from_pretrained(built["full"])
    rows: dict[str, Any] = {}
    for method, results in runs.items():
        seconds = [r["step_seconds"] for r in results]
        cpu = [r["cpu_seconds"] for r in results]
        memory = [r["memory_mb"] for r in results]
        if method in ("offsite", "lora"):
            download = built[method]["tar_bytes"]  # the job package a client of that mode fetches
        elif method == "offsite_bare":
            download = emulator_bytes
        else:
            download = full_bytes
        rows[method] = {"step_seconds": statistics.median(seconds), "step_seconds_min": min(seconds),
                        "step_seconds_max": max(seconds), "cpu_seconds": statistics.median(cpu),
                        "cpu_seconds_min": min(cpu), "cpu_seconds_max": max(cpu),
                        "memory_mb": statistics.median(memory), "memory_mb_min": min(memory),
                        "memory_mb_max": max(memory),
                        "download_once_bytes": download, "per_round_bytes": results[0]["trainable_bytes"]}
    ref = rows.get("full_ft")
    for r in rows.values():
        if ref is not None:
            for key in ("step_seconds", "cpu_seconds", "memory_mb", "download_once_bytes", "per_round_bytes"):
                r[f"{key}_ratio"] = r[key] / ref[key]
    result: dict[str, Any] = {"model": "smollm2-135m", "batch": batch, "max_length": 64, "steps": steps,
                              "repeats": repeats, "layout": json.loads(layout.to_json()), "methods": rows,
                              "ideal": ideals(config, layout.num_emulator_blocks)}
    if "offsite" in rows and "lora" in rows:
        # CPU seconds of the one-threaded step: what the step costs, far less disturbed by other processes
        # on a shared machine than the wall clock (both are reported)
        speedup = rows["lora"]["cpu_seconds"] / rows["offsite"]["cpu_seconds"]
        result["offsite_speedup_over_lora"] = speedup
        result["offsite_speedup_over_lora_wall"] = rows["lora"]["step_seconds"] / rows["offsite"]["step_seconds"]
        result["fraction_of_block_limit"] = speedup * result["ideal"]["blocks_offsite_over_lora"]
        result["fraction_of_flop_limit"] = speedup * result["ideal"]["flops_offsite_over_lora"]
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| method | CPU s/step median (min-max) | ratio to full FT | wall s/step median (min-max) | ratio "
             "| memory MB median (min-max) | ratio | download once MB (ratio) | per round MB (ratio) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        lines.append(
            f"| {method} | {r['cpu_seconds']:.2f} ({r['cpu_seconds_min']:.2f}-{r['cpu_seconds_max']:.2f}) "
            f"| {r.get('cpu_seconds_ratio', float('nan')):.2f} "
            f"| {r['step_seconds']:.2f} ({r['step_seconds_min']:.2f}-{r['step_seconds_max']:.2f}) "
            f"| {r.get('step_seconds_ratio', float('nan')):.2f} "
            f"| {r['memory_mb']:.0f} ({r['memory_mb_min']:.0f}-{r['memory_mb_max']:.0f}) "
            f"| {r.get('memory_mb_ratio', float('nan')):.2f} "
            f"| {r['download_once_bytes'] / 1e6:.1f} ({r.get('download_once_bytes_ratio', float('nan')):.2f}) "
            f"| {r['per_round_bytes'] / 1e6:.2f} ({r.get('per_round_bytes_ratio', float('nan')):.3f}) |")
    ideal = result["ideal"]
    lines.append("")
    lines.append(f"ideal offsite/LoRA time: {ideal['blocks_offsite_over_lora']:.2f} by blocks, "
                 f"{ideal['flops_offsite_over_lora']:.2f} by multiply-adds (the output layer is paid in full)")
    if "offsite_speedup_over_lora" in result:
        lines.append(f"offsite client speed-up over the LoRA client: {result['offsite_speedup_over_lora']:.2f}x in CPU "
                     f"time ({result['offsite_speedup_over_lora_wall']:.2f}x wall) = "
                     f"{result['fraction_of_block_limit']:.2f} of the block-count limit, "
                     f"{result['fraction_of_flop_limit']:.2f} of the multiply-add limit")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="sweeps over all methods, interleaved")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement, after one warm-up step")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--keep", type=int, default=6, help="middle blocks the emulator keeps (of 26)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "data"
                                          / "wordnet_supersense.train.jsonl.gz"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result = run(args.repeats, args.steps, args.batch, args.keep, args.data, tuple(args.methods))
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
