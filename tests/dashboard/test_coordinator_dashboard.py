"""fedsite-coordinator serve --dashboard-port with a token: a real coordinator and two client processes.

The dashboard answers from before the job package exists to after the last
round; a request without the token is refused throughout; the status follows
the job (waiting, rounds, done) and at the end ``/api/status`` holds exactly
the rows of ``metrics.jsonl`` and every client that took part.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.live_job import DASHBOARD_TOKEN, live_job

pytestmark = pytest.mark.slow


def test_api_status_follows_a_real_job_and_needs_the_token(tmp_path: Path, tiny_bert_dir: Path) -> None:
    with live_job(tmp_path, tiny_bert_dir, clients=2, rounds=2) as job:
        assert job.url.startswith("http://127.0.0.1:")
        assert job.get("/api/status")[0] == 401
        assert job.get("/api/status", token="not-" + DASHBOARD_TOKEN)[0] == 401
        status, body = job.get("/", token=None)
        assert status == 200 and b"<form" in body and b"dashboard-e2e" not in body  # the sign-in form only
        code, body = job.get("/api/status", token=DASHBOARD_TOKEN)
        assert code == 200
        first = json.loads(body)
        assert first["job"] == "dashboard-e2e" and first["rounds"] == 2 and not first["final"]

        job.start_clients()
        seen: list[tuple[str, int]] = []
        doc: dict[str, Any] = first
        deadline = time.monotonic() + 900
        while not doc["final"]:
            assert time.monotonic() < deadline, f"no final status; seen {seen[-5:]}\n{job.logs()}"
            assert job.coordinator.poll() is None, job.logs()
            time.sleep(0.3)
            code, body = job.get("/api/status", token=DASHBOARD_TOKEN)
            assert code == 200
            doc = json.loads(body)
            if not seen or seen[-1] != (doc["status"], doc["completed_rounds"]):
                seen.append((doc["status"], doc["completed_rounds"]))
        assert job.get("/api/status")[0] == 401  # still refused without it at the end

    rounds_seen = [done for _, done in seen]
    assert rounds_seen == sorted(rounds_seen), seen  # progress never goes backwards
    assert any(status in ("running", "waiting_for_clients") for status, _ in seen), seen
    assert doc["status"] == "done" and doc["status_text"].startswith("done: 2 rounds (2 ok)")
    records = job.records()
    assert doc["metrics"] == records  # row for row
    ids = sorted(records[-1]["completed_client_ids"])
    clients = {c["id"]: c for c in doc["clients"]}
    assert sorted(clients) == ids and len(ids) == 2
    for cid in ids:
        assert clients[cid]["enrolled"] and clients[cid]["sampled"] == 2 and clients[cid]["completed"] == 2
        assert clients[cid]["name"] in ("party-0", "party-1")
    assert doc["clients_summary"]["enrolled"] == 2
    text = json.dumps(doc)
    assert DASHBOARD_TOKEN not in text and "tok-alpha" not in text  # no dashboard or enrolment token
