"""Reports of simulation runs: report.md, PNG plots, report.html and the table printed at the end of a run.

Reads only what every fedsite run writes (``metrics.jsonl``, ``job.toml.json``),
so it reports gRPC coordinator runs as well as simulations, one run or several
compared. Each plot is also described in ``plots.json`` (title, axis labels,
series and their points), which is what tests and other tools read back.
``report.html`` is the live dashboard's page as the run ended
(:mod:`coordinator.dashboard.static`): self-contained, it opens from disk.

    python -m simulations.report RUN_DIR [RUN_DIR ...] --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from coordinator.dashboard.static import write_static_page
from coordinator.metrics import MetricsLog
from localio.atomic import atomic_write_text

EPSILON_KEYS = ("epsilon_local_max", "epsilon_client")
METRIC_KEYS = ("val_accuracy", "val_perplexity")


class ReportError(ValueError):
    """A run directory without metrics to report."""


@dataclass
class Run:
    name: str
    folder: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def metric(self) -> str | None:
        return next((k for k in METRIC_KEYS if any(isinstance(r.get(k), int | float) for r in self.records)), None)


@dataclass
class PlotSpec:
    file: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]


def load_run(folder: Path, name: str | None = None) -> Run:
    records = MetricsLog(folder / "metrics.jsonl").read()
    if not records:
        raise ReportError(f"{folder}: no metrics.jsonl records to report")
    config: dict[str, Any] = {}
    if (folder / "job.toml.json").exists():
        config = json.loads((folder / "job.toml.json").read_text())
    return Run(name=name or folder.name, folder=folder, records=records, config=config)


def _points(run: Run, key: str) -> list[tuple[float, float]]:
    points = []
    for r in run.records:
        value = r.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points.append((float(r["round"]), float(value)))
    return points


def plot_specs(runs: list[Run]) -> list[PlotSpec]:
    """What to draw: the validation metric, ε when any run spent some, bytes per round."""
    specs: list[PlotSpec] = []
    metrics = {run.metric for run in runs if run.metric}
    for metric in METRIC_KEYS:
        if metric not in metrics:
            continue
        label = "validation accuracy" if metric == "val_accuracy" else "validation perplexity"
        series = {run.name: _points(run, metric) for run in runs if run.metric == metric}
        specs.append(PlotSpec(file=f"{metric}.png", title=f"{label} per round", xlabel="round", ylabel=label,
                              series=series))
    eps_series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for key in EPSILON_KEYS:
            points = _points(run, key)
            if points:
                eps_series[f"{run.name} ({key.removeprefix('epsilon_').replace('_max', '')})"] = points
    if eps_series:
        specs.append(PlotSpec(file="epsilon.png", title="privacy spent (ε) per round", xlabel="round",
                              ylabel="ε (cumulative)", series=eps_series))
    utility = _privacy_utility(runs)
    if utility is not None:
        specs.append(utility)
    bytes_series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for key, arrow in (("bytes_down", "down"), ("bytes_up", "up")):
            points = [(x, y / 1e6) for x, y in _points(run, key) if x > 0]
            if points:
                bytes_series[f"{run.name} {arrow}"] = points
    specs.append(PlotSpec(file="bytes.png", title="bytes moved per round", xlabel="round", ylabel="MB per round",
                          series=bytes_series))
    return specs


def _privacy_utility(runs: list[Run]) -> PlotSpec | None:
    """The privacy-utility curve of a comparison over ε: each private run's final metric at the ε it spent,
    the runs without DP as a level line. Drawn when at least two runs of one metric spent ε."""
    metric = next((m for m in METRIC_KEYS if sum(1 for r in runs if r.metric == m and _points(r, EPSILON_KEYS[0]))
                   >= 2), None)
    if metric is None:
        return None
    private: list[tuple[float, float]] = []
    plain: dict[str, float] = {}
    for run in runs:
        points = _points(run, metric) if run.metric == metric else []
        if not points:
            continue
        spent = max((y for _, y in _points(run, EPSILON_KEYS[0])), default=None)
        if spent is None:
            plain[run.name] = points[-1][1]
        else:
            private.append((spent, points[-1][1]))
    private.sort()
    span = (private[0][0], private[-1][0])
    series = {"DP-SGD (sample-level)": private}
    series.update({f"{name} (no DP)": [(span[0], value), (span[1], value)] for name, value in plain.items()})
    label = "validation accuracy" if metric == "val_accuracy" else "validation perplexity"
    return PlotSpec(file="privacy_utility.png", title=f"privacy-utility: final {label} against ε",
                    xlabel="ε per client (spent by the end)", ylabel=f"final {label}", series=series)


def draw(spec: PlotSpec) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors: dict[str, str] = {}  # one colour per run; "down" solid and "up" dashed share it
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, points in spec.series.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        run = name.removesuffix(" down").removesuffix(" up")
        color = colors.setdefault(run, palette[len(colors) % len(palette)])
        style = "--" if name.endswith(" up") else "-"
        axes.plot(xs, ys, style, color=color, marker="o", markersize=4, label=name)
    if spec.file in ("bytes.png", "epsilon.png"):
        axes.set_ylim(bottom=0)  # amounts: start at zero so equal runs do not look different
    axes.set_title(spec.title)
    axes.set_xlabel(spec.xlabel)
    axes.set_ylabel(spec.ylabel)
    axes.grid(True, alpha=0.3)
    axes.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    if spec.series:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def format_table(records: list[dict[str, Any]]) -> str:
    """Round by round: status, clients, validation metric, ε, MB moved, seconds."""
    metric = next((k for k in METRIC_KEYS if any(k in r for r in records)), None)
    eps_keys = [k for k in EPSILON_KEYS if any(isinstance(r.get(k), int | float) for r in records)]
    head = ["round", "status", "clients", metric or "metric", *(k.replace("epsilon_", "eps_") for k in eps_keys),
            "MB down", "MB up", "seconds"]
    rows = []
    for r in records:
        value = r.get(metric) if metric else None
        row = [str(r["round"]), str(r.get("status", "baseline")),
               f"{r.get('completed_clients', 0)}/{r.get('sampled_clients', 0)}",
               f"{value:.4f}" if isinstance(value, int | float) else "-"]
        row += [f"{r[k]:.3f}" if isinstance(r.get(k), int | float) else "-" for k in eps_keys]
        row += [f"{r.get('bytes_down', 0) / 1e6:.2f}", f"{r.get('bytes_up', 0) / 1e6:.2f}",
                f"{r.get('seconds', 0.0):.1f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def print_table(records: list[dict[str, Any]], *, file: IO[str] = sys.stdout, title: str = "") -> None:
    if title:
        print(title, file=file)
    print(format_table(records), file=file)
    file.flush()


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_row(run: Run) -> list[str]:
    metric = run.metric
    points = _points(run, metric) if metric else []
    first = f"{points[0][1]:.4f}" if points else "-"
    last = f"{points[-1][1]:.4f}" if points else "-"
    eps = [max((y for _, y in _points(run, k)), default=None) for k in EPSILON_KEYS]
    eps_text = ", ".join(f"{k.removeprefix('epsilon_').removesuffix('_max')}={v:.2f}"
                         for k, v in zip(EPSILON_KEYS, eps, strict=True) if v is not None) or "-"
    rounds = [r for r in run.records if r["round"] > 0]
    moved = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds) / 1e6
    seconds = sum(r.get("seconds", 0.0) for r in run.records)
    ok = sum(1 for r in rounds if r.get("status") == "ok")
    sim = run.config.get("simulation") or {}
    setup = (f"{sim.get('clients', '?')} clients, {sim.get('partition', '?')}"
             + (f" α={sim.get('alpha')}" if sim.get("partition") == "dirichlet" else "")) if sim else "-"
    return [run.name, str(run.config.get("job", {}).get("mode", "-")), setup, f"{ok}/{len(rounds)}",
            f"{first} → {last}", eps_text, f"{moved:.1f}", f"{seconds:.0f}"]


RAY_CLUSTER_NOTE = """\
## Running the same job on a Ray cluster

The simulation runs on Flower's simulation engine with its Ray backend. By
default it starts a private Ray instance on this machine
(`--ray-address local`). To use a cluster, start Ray on the nodes
(`ray start --head` on one, `ray start --address HEAD:6379` on the others),
make the repository (or the installed `fedsite` package), the job file's data
and the output directory visible at the same paths on every node (a shared
file system), then run on the head node:

    fedsite-simulate JOB.toml --ray-address auto --cpus-per-client 2

Each virtual client then reserves `--cpus-per-client` CPUs; Flower creates as
many actors as the cluster fits and streams the sampled clients through them.
"""


def write_report(folders: list[Path], output_dir: Path, *, names: list[str] | None = None,
                 title: str = "fedsite simulation report") -> Path:
    """report.md, one PNG per plot, plots.json and the dashboard page (report.html) in ``output_dir``;
    returns the report's path."""
    runs = [load_run(folder, names[i] if names else None) for i, folder in enumerate(folders)]
    output_dir.mkdir(parents=True, exist_ok=True)
    specs = plot_specs(runs)
    for spec in specs:
        figure = draw(spec)
        tmp = output_dir / (spec.file + ".partial.png")
        figure.savefig(tmp, format="png")
        plt.close(figure)
        tmp.replace(output_dir / spec.file)
    atomic_write_text(output_dir / "plots.json", json.dumps(
        [{"file": s.file, "title": s.title, "xlabel": s.xlabel, "ylabel": s.ylabel,
          "series": {k: [list(p) for p in v] for k, v in s.series.items()}} for s in specs], indent=1) + "\n")
    pages = _write_pages(runs, output_dir, named=names is not None)
    parts = [f"# {title}", ""]
    parts += ["The dashboard of " + ", ".join(f"[{run.name}]({page.name})" for run, page in pages)
              + " (open in a browser; it works offline).", ""]
    parts.append(_markdown_table(
        ["run", "mode", "clients / split", "rounds ok", "validation (round 0 → last)", "ε spent",
         "MB moved", "seconds"],
        [_summary_row(run) for run in runs]))
    parts.append("")
    for spec in specs:
        parts += [f"![{spec.title}]({spec.file})", ""]
    for run in runs:
        parts += [f"## {run.name}", "", f"Output: `{run.folder}`", "", "```", format_table(run.records), "```", ""]
    parts.append(RAY_CLUSTER_NOTE)
    path = output_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _write_pages(runs: list[Run], output_dir: Path, *, named: bool) -> list[tuple[Run, Path]]:
    """The live dashboard's page as each run ended: report.html for one run, report-<name>.html for several.
    Titled with the job's name unless the caller named the runs."""
    pages = []
    for run in runs:
        page = output_dir / ("report.html" if len(runs) == 1 else f"report-{_file_name(run.name)}.html")
        pages.append((run, write_static_page(run.folder, page, name=run.name if named else None)))
    return pages


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run output directories (each with metrics.jsonl)")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
