"""Score an exported model the way a user who never installed fedsite would: plain ``transformers``
(and ``peft`` for the adapter), the validation JSONL, accuracy. No fedsite import on purpose, so the
number checks the export, not fedsite's own evaluation.

    python experiments/privacy/score_export.py RUN_DIR/final [--data VALIDATION.jsonl.gz] [--adapter]

``--adapter`` loads ``final/adapter/`` with ``peft.PeftModel`` over the job's base model (the run's
``package/model``: MiniLM with the job's labels and, with mean pooling, its pooling block) instead of
the merged ``final/``; both must give the same accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
VALIDATION = ROOT / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        return [json.loads(line) for line in handle if line.strip()]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, tokenizer, rows: list[dict], max_length: int, batch: int = 256) -> float:
    label2id = {label: int(i) for label, i in model.config.label2id.items()}
    right = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1)
        right += sum(int(p) == label2id[r["label"]] for p, r in zip(predicted.tolist(), chunk, strict=True))
    return right / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("final", type=Path)
    ap.add_argument("--data", type=Path, default=VALIDATION)
    ap.add_argument("--adapter", action="store_true")
    ap.add_argument("--max-length", type=int, default=0, help="0 = the job's, from final/fedsite.json if present")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(str(args.final))
    if args.adapter:
        from peft import PeftModel

        adapter = args.final / "adapter"
        base = AutoModelForSequenceClassification.from_pretrained(str(args.final.parent / "package" / "model"))
        model = PeftModel.from_pretrained(base, str(adapter))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(args.final))
    model.eval()
    max_length = args.max_length or 32
    rows = read_rows(args.data)
    acc = accuracy(model, tokenizer, rows, max_length)
    print(json.dumps({"final": str(args.final), "adapter": args.adapter, "examples": len(rows),
                      "max_length": max_length, "accuracy": round(acc, 4)}))


if __name__ == "__main__":
    main()
