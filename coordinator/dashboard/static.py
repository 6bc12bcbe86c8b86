"""The dashboard of a finished run, from its folder alone: the page behind a report's ``report.html``.

Reads what every run writes (``metrics.jsonl``, ``job.toml.json``, and for a
coordinator run ``clients.json`` for the clients' names and enrolment times,
leaving its hashes alone) and renders the same page as the live dashboard,
with its stylesheet inlined and no script, so it opens from disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from coordinator.dashboard.render import render_page
from coordinator.dashboard.status import JobInfo, build_status, finished_phase
from coordinator.metrics import MetricsLog
from coordinator.registry import ClientSeen
from localio.atomic import atomic_write_text


def _registered_clients(folder: Path) -> list[ClientSeen] | None:
    path = folder / "clients.json"
    if not path.exists():
        return None
    try:
        raw: list[dict[str, Any]] = json.loads(path.read_text()).get("clients", [])
    except (OSError, ValueError, AttributeError):
        return None  # a report never fails over the registry: the table then comes from the records
    return [ClientSeen(str(c.get("client_id", "")), str(c.get("name", "")), float(c.get("enrolled_at", 0.0)), None)
            for c in raw if c.get("client_id") and not c.get("revoked")]


def static_status(folder: Path, name: str | None = None) -> dict[str, Any]:
    """The status document of the run in ``folder`` as it ended (done, or stopped part way)."""
    config: dict[str, Any] = {}
    if (folder / "job.toml.json").exists():
        config = json.loads((folder / "job.toml.json").read_text())
    info = JobInfo.from_dict(config)
    if name or not info.name:
        info = dataclasses.replace(info, name=name or folder.name)
    records = MetricsLog(folder / "metrics.jsonl").read()
    updated = (folder / "metrics.jsonl").stat().st_mtime if records else None
    return build_status(info, finished_phase(info, records), records, live_clients=_registered_clients(folder),
                        source="report", now=updated)


def write_static_page(folder: Path, path: Path, name: str | None = None) -> Path:
    """Write the finished run's page (``report.html``): the live page's content without its polling script."""
    atomic_write_text(path, render_page(static_status(folder, name), live=False))
    return path
