"""Print the SmolLM2 offsite table (markdown) from the JSON files run_smollm2.sh writes.

    python experiments/offsite/summarize_smollm2.py experiments/offsite/smollm2

Rows: the references (zero-shot, full-model LoRA, full FT) once, then per emulator (keepN.json) the
emulator before tuning, the tuned emulator alone, the plug-in and, where run, the refined plug-in;
beside them the three checks of the offsite targets: plug-in / zero-shot (<= 0.8), plug-in / full-model LoRA
(within 10 %), emulator alone / plug-in (>= 1.15, the protection gap). Then the greedy samples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _order(stem: str) -> tuple[int, str]:
    digits = "".join(c for c in stem.removeprefix("keep").split("-")[0] if c.isdigit())
    return int(digits or 0), stem


def load(folder: Path) -> tuple[dict, dict[str, dict]]:
    """The references and, by file stem (keep6, keep6-nodistill, ...), each emulator's rows."""
    base = json.loads((folder / "baselines.json").read_text())
    emulators = {p.stem: json.loads(p.read_text()) for p in folder.glob("keep*.json") if ".partial" not in p.name}
    ceiling = folder / "adapter-on-full.json"
    if ceiling.is_file():  # the adapter blocks trained on the full model itself: what a perfect emulator allows
        base["rows"].update(json.loads(ceiling.read_text())["rows"])
    return base, {k: emulators[k] for k in sorted(emulators, key=_order)}


def _label(stem: str) -> str:
    keep, _, variant = stem.removeprefix("keep").partition("-")
    return f"2+{keep}+2" + (f" {variant.replace('nodistill', 'layer drop only')}" if variant else " distilled")


def table(base: dict, emulators: dict[str, dict]) -> str:
    ref = base["rows"]
    zero, lora = ref.get("zero_shot"), ref.get("full_lora")
    lines = ["| model | held-out perplexity | / zero-shot | / full LoRA | emulator alone / this |",
             "|---|---|---|---|---|"]

    def row(name: str, value: float, emulator_alone: float | None = None) -> str:
        gap = f"{emulator_alone / value:.2f}" if emulator_alone else ""
        return (f"| {name} | {value:.2f} | {value / zero:.2f} | {value / lora:.2f} | {gap} |" if zero and lora
                else f"| {name} | {value:.2f} | | | {gap} |")

    for key, name in (("zero_shot", "zero-shot SmolLM2"), ("full_lora", "full-model LoRA (r=8, q/v)"),
                      ("full_ft", "full fine-tuning"), ("adapter_on_full", "adapter blocks trained on the full model")):
        if key in ref:
            lines.append(row(name, ref[key]))
    for keep, result in emulators.items():
        rows = result["rows"]
        alone = rows.get("emulator_alone")
        label = (f"{_label(keep)} (size {result['emulator_size_fraction']:.2f}, "
                 f"verbatim {result['verbatim_fraction']:.2f})")
        for key, name in (("emulator_untuned", "emulator before tuning"), ("emulator_alone", "emulator alone (tuned)"),
                          ("plug_in", "plug-in"), ("plug_in_refined", "plug-in refined")):
            if key in rows:
                lines.append(row(f"{label}: {name}", rows[key], alone if key.startswith("plug_in") else None))
    return "\n".join(lines)


def samples(base: dict, emulators: dict[str, dict]) -> str:
    out: list[str] = []
    for title, result in [("references", base), *((_label(k), r) for k, r in emulators.items())]:
        for row, texts in result.get("notes", {}).get("samples", {}).items():
            out.append(f"- {title}, {row}:")
            out.extend("  - `" + text.replace("\n", "⏎").replace("`", "'") + "`" for text in texts)
    return "\n".join(out)


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "experiments/offsite/smollm2")
    base, emulators = load(folder)
    print(table(base, emulators))
    print()
    print(samples(base, emulators))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
