"""The report renders: report.md, non-empty PNGs whose axes are named, ε and bytes when present."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from coordinator.metrics import MetricsLog
from simulations.report import ReportError, draw, format_table, load_run, plot_specs, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(folder: Path, *, accuracies: list[float], eps: list[float] | None = None) -> Path:
    log = MetricsLog(folder / "metrics.jsonl")
    for round_id, accuracy in enumerate(accuracies):
        record = {"round": round_id, "sampled_clients": 3 if round_id else 0, "completed_clients": 3 if round_id else 0,
                  "dropped_clients": 0, "val_accuracy": accuracy, "bytes_down": 1_200_000 * (round_id > 0),
                  "bytes_up": 1_100_000 * (round_id > 0), "seconds": 2.5, "status": "ok" if round_id else None}
        if eps is not None and round_id:
            record["epsilon_local_max"] = eps[round_id - 1]
        log.append(record)
    (folder / "job.toml.json").write_text(json.dumps({"job": {"mode": "lora"},
                                                      "simulation": {"clients": 10, "partition": "dirichlet",
                                                                     "alpha": 0.5}}))
    return folder


def test_report_with_two_runs_plots_metric_epsilon_and_bytes(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", accuracies=[0.05, 0.2, 0.3])
    b = _fake_run(tmp_path / "b", accuracies=[0.05, 0.15, 0.25], eps=[1.5, 2.5])
    report = write_report([a, b], tmp_path / "out", names=["plain", "dp"])
    text = report.read_text()
    specs = json.loads((tmp_path / "out" / "plots.json").read_text())
    assert [s["file"] for s in specs] == ["val_accuracy.png", "epsilon.png", "bytes.png"]
    for spec in specs:
        png = tmp_path / "out" / spec["file"]
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5_000
        pixels = mpimg.imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert float(np.std(pixels)) > 0.05  # something is drawn, not a blank canvas
        assert spec["xlabel"] == "round" and spec["ylabel"]
        assert f"]({spec['file']})" in text
    accuracy, epsilon, moved = specs
    assert accuracy["series"]["plain"] == [[0.0, 0.05], [1.0, 0.2], [2.0, 0.3]]
    assert list(epsilon["series"]) == ["dp (local)"] and epsilon["series"]["dp (local)"][-1] == [2.0, 2.5]
    assert moved["series"]["plain down"] == [[1.0, 1.2], [2.0, 1.2]]
    assert "| plain | lora | 10 clients, dirichlet α=0.5 | 2/2 | 0.0500 → 0.3000 | - | 4.6 |" in text
    assert "local=2.50" in text and "ray-address auto" in text


def test_drawn_figures_name_their_axes(tmp_path: Path) -> None:
    run = load_run(_fake_run(tmp_path / "a", accuracies=[0.1, 0.4], eps=[3.0]))
    for spec in plot_specs([run]):
        axes = draw(spec).axes[0]
        assert axes.get_xlabel() == "round" and axes.get_ylabel() == spec.ylabel and axes.get_title()
        assert len(axes.get_lines()) == len([s for s in spec.series.values() if s])


def test_terminal_table_shows_metric_epsilon_bytes_and_time(tmp_path: Path) -> None:
    run = load_run(_fake_run(tmp_path / "a", accuracies=[0.1, 0.4], eps=[3.25]))
    lines = format_table(run.records).splitlines()
    assert lines[0].split() == ["round", "status", "clients", "val_accuracy", "eps_local_max", "MB", "down", "MB",
                                "up", "seconds"]
    assert lines[3].split() == ["1", "ok", "3/3", "0.4000", "3.250", "1.20", "1.10", "2.5"]


def test_a_folder_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no metrics\.jsonl"):
        write_report([tmp_path], tmp_path / "out")


def test_a_comparison_over_epsilon_draws_the_privacy_utility_curve(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path / "off", accuracies=[0.05, 0.6]),
            _fake_run(tmp_path / "e8", accuracies=[0.05, 0.59], eps=[8.0]),
            _fake_run(tmp_path / "e1", accuracies=[0.05, 0.4], eps=[1.0]),
            _fake_run(tmp_path / "e4", accuracies=[0.05, 0.55], eps=[4.0])]
    write_report(runs, tmp_path / "out", names=["dp_off", "dp_eps8", "dp_eps1", "dp_eps4"])
    specs = {s["file"]: s for s in json.loads((tmp_path / "out" / "plots.json").read_text())}
    curve = specs["privacy_utility.png"]
    assert curve["series"]["DP-SGD (sample-level)"] == [[1.0, 0.4], [4.0, 0.55], [8.0, 0.59]]
    assert curve["series"]["dp_off (no DP)"] == [[1.0, 0.6], [8.0, 0.6]]
    assert (tmp_path / "out" / "privacy_utility.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "](privacy_utility.png)" in (tmp_path / "out" / "report.md").read_text()
