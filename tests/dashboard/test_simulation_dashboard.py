"""fedsite-simulate JOB.toml --dashboard-port: the same dashboard for a Flower simulation, then report.html.

A real ``python -m simulations`` process (Ray, a tiny random BERT, 4 virtual
clients): while it runs, ``/api/status`` says it is a simulation, lists the
virtual clients and follows the rounds; when it ends, the report holds the
same page as a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from simulations.harness.local_cluster import REPO, process_env, tail
from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job

pytestmark = pytest.mark.slow


def _status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/status", timeout=30) as reply:
            return json.loads(reply.read())
    except OSError:  # URLError, refused, timed out: not up yet, closed at the end, or a starved process
        return None


def test_a_simulation_serves_the_dashboard_and_writes_report_html(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "tiny-bert")
    job = tiny_job(tmp_path, model, clients=4, per_round=2, rounds=2, max_train_examples=200)
    out = tmp_path / "run"
    log = tmp_path / "simulate.log"
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "simulations", str(job), "--output-dir", str(out),
                                 "--no-progress", "--dashboard-port", "0"],
                                stdout=sink, stderr=subprocess.STDOUT, env=process_env(1), cwd=str(REPO))
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 900
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, tail(log)
            url_file = out / "dashboard"
            if url_file.exists() and url_file.read_text().strip():
                doc = _status(url_file.read_text().strip())
                if doc is not None and (not seen or (doc["status"], doc["completed_rounds"])
                                        != (seen[-1]["status"], seen[-1]["completed_rounds"])):
                    seen.append(doc)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, tail(log)
    assert seen, tail(log)
    assert all(doc["source"] == "simulation" for doc in seen)
    running = [doc for doc in seen if doc["status"] == "running"]
    assert running, [(d["status"], d["status_text"]) for d in seen]
    assert running[-1]["settings"]["virtual_clients"] == 4
    assert [c["id"] for c in running[-1]["clients"]] == [f"client-{i:05d}" for i in range(4)]
    assert running[-1]["clients_summary"]["online"] is None  # virtual clients are neither online nor offline

    page = (out / "report.html").read_text()
    assert "done: 2 rounds (2 ok)" in page and "<script" not in page
    assert "report.html" in (out / "report.md").read_text()
