"""Reading a party's local examples: JSONL or CSV, plain or gzip.

Classification rows need ``text`` and ``label``; language-modelling rows need
``text``. Problems a user can cause (missing file, bad row, unknown label)
raise :class:`DataError` with the file and line in the message.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localio.errors import user_error


@user_error
class DataError(ValueError):
    """A data file that cannot be used as asked."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None


def open_text(path: Path) -> io.TextIOBase:
    """A data or text file for reading as UTF-8 text, gunzipped on the fly when it ends in ``.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last in (".csv", ".tsv"):
        return last[1:]
    raise DataError(f"{path}: unknown data format {last!r}; use .jsonl or .csv (optionally .gz)")


def read_examples(path: str | Path, *, need_label: bool) -> list[Example]:
    """All examples of a JSONL/CSV file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = _format_of(path)
    examples: list[Example] = []
    try:
        with open_text(path) as handle:
            if fmt == "jsonl":
                for line_no, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line_no}: each line must be a JSON object")
                    examples.append(_example(row, path, line_no, need_label))
            else:
                reader = csv.DictReader(handle, delimiter="\t" if fmt == "tsv" else ",")
                for line_no, row in enumerate(reader, start=2):
                    examples.append(_example(row, path, line_no, need_label))
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _example(row: dict, path: Path, line_no: int, need_label: bool) -> Example:
    text = row.get("text")
    if not isinstance(text, str) or not text:
        raise DataError(f"{path}:{line_no}: missing or empty 'text'")
    label = row.get("label")
    if need_label:
        if label is None or label == "":
            raise DataError(f"{path}:{line_no}: missing 'label'")
        label = str(label)
    return Example(text=text, label=label if label is None else str(label))


def label_set(examples: Sequence[Example]) -> list[str]:
    return sorted({e.label for e in examples if e.label is not None})


def check_labels(examples: Sequence[Example], known: Sequence[str], source: str) -> None:
    """Every label must be one the job knows; name the first stranger."""
    allowed = set(known)
    for example in examples:
        if example.label not in allowed:
            raise DataError(
                f"{source}: label {example.label!r} is not one of the job's {len(allowed)} labels "
                f"(e.g. {', '.join(sorted(allowed)[:5])}, ...)"
            )


def sample(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """A seeded sample of at most ``limit`` examples (0 = all), in file order."""
    if limit <= 0 or limit >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for example in examples:
            row = {"text": example.text} if example.label is None else {"text": example.text, "label": example.label}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
