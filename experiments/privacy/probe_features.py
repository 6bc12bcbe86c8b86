"""Mean-pooled MiniLM features of the whole train and validation splits, computed once, for the
quick recipe search in probe_sweep.py (what a client's frozen-prefix cache holds under the default
recipe: the [CLS] output of the mean-pooling block, max length 32).

    python experiments/privacy/probe_features.py [--out /tmp/fedsite-probe-features.pt]   # ~5 min, 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from emulator.models import embedded_model_path, load_model, load_tokenizer  # noqa: E402
from emulator.tasks import encode  # noqa: E402
from localio.data import read_examples  # noqa: E402

DATA = ROOT / "coordinator" / "examples" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/fedsite-probe-features.pt")
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train = read_examples(DATA / "wordnet_supersense.train.jsonl.gz", need_label=True)
    val = read_examples(DATA / "wordnet_supersense.validation.jsonl.gz", need_label=True)
    labels = sorted({r.label for r in train if r.label})
    label2id = {label: i for i, label in enumerate(labels)}
    path = embedded_model_path()
    tokenizer = load_tokenizer(path)
    model = load_model(path, "classification", labels, pooling="mean").eval()

    @torch.inference_mode()
    def features(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        data = encode(rows, tokenizer, task="classification", max_length=args.max_length, label2id=label2id)
        order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
        out = torch.zeros(len(data), model.config.hidden_size)
        for start in range(0, len(order), 256):
            index = order[start : start + 256]
            batch = data.collate([data[i] for i in index])
            hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out[index] = hidden.last_hidden_state[:, 0]
        return out, torch.tensor(data.labels)

    start = time.time()
    x_train, y_train = features(train)
    x_val, y_val = features(val)
    torch.save({"Xtr": x_train, "ytr": y_train, "Xva": x_val, "yva": y_val}, args.out)
    print(f"{len(train)} + {len(val)} examples in {time.time() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
