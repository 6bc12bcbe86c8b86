"""Print the table of experiments/privacy/results.jsonl (what RESULTS.md is written from).

    python experiments/privacy/summarize.py [--tags PREFIX ...]

One row per run (the latest run of a tag wins): its overrides, validation accuracy on the
whole validation split (11,648 synsets), per-client ε at the end, the noise multipliers the
clients used in the last round, and the accuracy per round as the job saw it on its sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tags", nargs="*", default=[], help="only tags starting with one of these")
    ap.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = ap.parse_args()
    runs: dict[str, dict] = {}
    for line in Path(args.results).read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            runs[run["tag"]] = run
    print(f"{'tag':<34} {'acc':>6} {'eps':>6} {'sigma':>11} {'min':>5}  rounds (sample acc)")
    for tag, run in runs.items():
        if args.tags and not any(tag.startswith(prefix) for prefix in args.tags):
            continue
        sigmas = list((run.get("noise_multiplier_local") or {}).values())
        sigma = f"{min(sigmas):.2f}-{max(sigmas):.2f}" if sigmas else "-"
        eps = run.get("epsilon_local_max")
        curve = " ".join(f"{r['val_accuracy']:.2f}" for r in run["rounds"][1:] if r.get("val_accuracy") is not None)
        print(f"{tag:<34} {run['val_accuracy_full']:6.3f} {eps if eps is None else round(eps, 2)!s:>6} "
              f"{sigma:>11} {run['seconds'] / 60:5.1f}  {curve}")


if __name__ == "__main__":
    main()
