"""Print results.jsonl (from run_minilm.py) as one markdown table, one line per tag.

    python experiments/offsite/summarize.py [results.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BRIEF_FULL_FT = 0.757  # the brief's centralized full fine-tuning (another trainer), if none was measured here
COLUMNS = ("linear_probe", "full_lora", "full_ft", "adapter_on_full", "emulator_alone", "plug_in")


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).with_name("results.jsonl")
    merged: dict[str, dict[str, object]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        # refinement records (run_minilm.py --refine-steps) carry no exposure figures
        row = merged.setdefault(rec["tag"], {"verbatim": rec.get("verbatim_fraction"),
                                             "size": rec.get("emulator_size_fraction")})
        row.update(rec["rows"])
        for key in ("hidden_distance_before", "hidden_distance_after"):
            if key in rec:
                row[key] = rec[key]
    measured = [ft for row in merged.values() if isinstance(ft := row.get("full_ft"), float)]
    reference = max(measured) if measured else BRIEF_FULL_FT  # the best full fine-tuning is the bar
    refined = sorted({k for row in merged.values() for k in row if k.startswith("plug_in_refined_")},
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    columns = (*COLUMNS, *refined)
    head = ["tag", *columns, f"plug-in / full FT {reference:.3f}", "hidden dist before→after", "size", "verbatim"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for tag, row in merged.items():
        cells = [tag]
        cells += [f"{row[c]:.4f}" if c in row else "" for c in columns]
        plug = row.get("plug_in")
        cells.append(f"{plug / reference:.3f}" if isinstance(plug, float) else "")
        before, after = row.get("hidden_distance_before"), row.get("hidden_distance_after")
        cells.append(f"{before:.3f}→{after:.3f}" if isinstance(before, float)
                     and isinstance(after, float) else
                     (f"{before:.3f}" if isinstance(before, float) else ""))
        cells += [f"{row[k]:.3f}" if isinstance(row[k], float) else "" for k in ("size", "verbatim")]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
