"""The dashboard's HTTP API over real loopback sockets: content, token, cookie, TLS, read-only, headers.

The server reads a real metrics.jsonl (written by MetricsLog, as the engine
writes it) and a real registry (clients enrolled with real tokens), so the
test can check that no reply ever carries a token or a token's hash.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.certs import make_dev_certs
from coordinator.dashboard import JobInfo, JobView
from coordinator.dashboard.server import CSP, DashboardError, DashboardServer, DashboardTLS
from coordinator.metrics import MetricsLog
from coordinator.registry import ClientRegistry

TOKENS = ["enrol-alpha-7f3c", "enrol-bravo-91d2"]
DASHBOARD_TOKEN = "watch-5d1e-88aa"
INFO = JobInfo(name="api-test", mode="lora", rounds=2, clients_per_round=2, min_clients=1)


@dataclass
class EngineAttributes:
    """What RoundEngine exposes to watchers (current_round, activity); the engine itself is tested elsewhere."""

    current_round: int = 0
    activity: str = "starting"


@dataclass
class Live:
    server: DashboardServer
    view: JobView
    metrics: MetricsLog
    registry: ClientRegistry
    client_ids: list[str]


def _reply(server: DashboardServer, method: str, path: str, *, headers: dict[str, str] | None = None,
           body: bytes | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    if context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def _start(tmp_path: Path, **kwargs: Any) -> Live:
    registry = ClientRegistry.from_tokens(TOKENS, tmp_path / "clients.json")
    ids = [registry.enroll(token, name=f"party-{i}")[0] for i, token in enumerate(TOKENS)]
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    view = JobView(INFO, metrics.path, registry=registry, refresh_s=0.0)  # every request sees the change
    server = DashboardServer(view, port=0, **kwargs)
    server.start()
    return Live(server, view, metrics, registry, ids)


@pytest.fixture
def open_dashboard(tmp_path: Path) -> Iterator[Live]:
    live = _start(tmp_path)
    yield live
    live.server.close()


@pytest.fixture
def guarded_dashboard(tmp_path: Path) -> Iterator[Live]:
    live = _start(tmp_path, token=DASHBOARD_TOKEN)
    yield live
    live.server.close()


def _secrets() -> list[bytes]:
    values = [*TOKENS, DASHBOARD_TOKEN]
    return [v.encode() for v in values] + [hashlib.sha256(v.encode()).hexdigest().encode() for v in values]


def _round(live: Live, round_id: int) -> dict[str, Any]:
    record = {"round": round_id, "status": "ok", "sampled_clients": 2, "completed_clients": 2,
              "sampled_client_ids": live.client_ids, "completed_client_ids": live.client_ids,
              "dropped_clients": 0, "val_accuracy": 0.1 * round_id, "train_loss": 1.0 / (round_id + 1),
              "bytes_down": 1000, "bytes_up": 900, "seconds": 1.5, "seconds_eval": float("nan")}
    live.metrics.append(record)
    return record


def test_status_follows_the_job_and_matches_metrics_jsonl(open_dashboard: Live) -> None:
    live, engine = open_dashboard, EngineAttributes()
    live.view.set_preparing("distilling the emulator: step 3/10, loss 0.5")
    status, headers, body = _reply(live.server, "GET", "/api/status")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert (doc["status"], doc["progress"], doc["metrics"]) == ("distilling", {"step": 3, "steps": 10}, [])
    live.view.attach(engine)
    engine.current_round, engine.activity = 1, "waiting for clients"
    doc = json.loads(_reply(live.server, "GET", "/api/status")[2])
    assert doc["status"] == "waiting_for_clients" and "(2 online, 1 needed)" in doc["status_text"]
    _round(live, 0)
    engine.activity = "train"
    doc = json.loads(_reply(live.server, "GET", "/api/status")[2])
    assert (doc["status_text"], doc["activity"], doc["schema"]) == ("round 1 of 2: training", "train", 2)
    _round(live, 1)
    _round(live, 2)
    engine.current_round, engine.activity = 2, "done"
    live.view.finish()
    doc = json.loads(_reply(live.server, "GET", "/api/status")[2])
    assert doc["metrics"] == live.metrics.read()  # row for row, NaN written as null by MetricsLog
    assert doc["status"] == "done" and doc["final"] and doc["completed_rounds"] == 2
    by_id = {c["id"]: c for c in doc["clients"]}
    assert sorted(by_id) == sorted(live.client_ids)
    assert all(c["sampled"] == 2 and c["completed"] == 2 and c["online"] for c in by_id.values())
    assert {c["name"] for c in by_id.values()} == {"party-0", "party-1"}


def test_page_fragment_and_assets_are_served_with_strict_headers(open_dashboard: Live) -> None:
    live = open_dashboard
    _round(live, 0)
    for path, kind in (("/", "text/html"), ("/fragment", "text/html"), ("/static/dashboard.css", "text/css"),
                       ("/static/dashboard.js", "text/javascript")):
        status, headers, body = _reply(live.server, "GET", path)
        assert status == 200 and headers["content-type"].startswith(kind), path
        assert headers["content-security-policy"] == CSP and headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
        assert all(secret not in body for secret in _secrets()), path
    page = _reply(live.server, "GET", "/")[2].decode()
    assert "api-test" in page and 'id="status-text"' in page and "party-0" in page
    assert _reply(live.server, "GET", "/nothing")[0] == 404
    assert _reply(live.server, "HEAD", "/api/status")[2] == b""
    assert 0 < live.server.cpu_seconds < 5  # what answering cost, counted for bench.dashboard


def test_it_is_read_only(open_dashboard: Live) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = _reply(open_dashboard.server, method, "/api/status", body=b"{}")
        assert status == 405 and headers["allow"] == "GET", method
    assert _reply(open_dashboard.server, "POST", "/login", body=b"token=x")[0] == 405  # no token, no login


def test_a_foreign_host_name_is_refused_without_a_token(open_dashboard: Live) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 must not read the status."""
    port = open_dashboard.server.port
    assert _reply(open_dashboard.server, "GET", "/api/status", headers={"Host": f"evil.example:{port}"})[0] == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _reply(open_dashboard.server, "GET", "/api/status", headers={"Host": host})[0] == 200


def test_a_request_without_the_token_is_refused(guarded_dashboard: Live) -> None:
    live = guarded_dashboard
    _round(live, 0)
    status, headers, body = _reply(live.server, "GET", "/api/status")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert _reply(live.server, "GET", "/fragment")[0] == 401
    assert _reply(live.server, "GET", "/api/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, body = _reply(live.server, "GET", "/")
    assert status == 200 and b'<form method="post" action="login">' in body and b"api-test" not in body
    status, _, body = _reply(live.server, "GET", "/api/status", headers={"Authorization": f"Bearer {DASHBOARD_TOKEN}"})
    assert status == 200 and json.loads(body)["metrics"] == live.metrics.read()
    assert all(secret not in body for secret in _secrets())


def test_the_sign_in_form_gives_a_cookie_that_is_not_the_token(guarded_dashboard: Live) -> None:
    live = guarded_dashboard
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = _reply(live.server, "POST", "/login", headers=form, body=b"token=nope")
    assert status == 401 and b"token not accepted" in body
    body_ok = urllib.parse.urlencode({"token": DASHBOARD_TOKEN}).encode()
    status, headers, _ = _reply(live.server, "POST", "/login", headers=form, body=body_ok)
    assert status == 303 and headers["location"] == "./"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert DASHBOARD_TOKEN not in cookie
    pair = cookie.split(";")[0]
    status, _, body = _reply(live.server, "GET", "/", headers={"Cookie": pair})
    assert status == 200 and b"api-test" in body
    assert _reply(live.server, "GET", "/fragment", headers={"Cookie": pair + "0"})[0] == 401


def test_guessing_the_token_is_rate_limited_per_address(guarded_dashboard: Live) -> None:
    live = guarded_dashboard
    codes = [_reply(live.server, "GET", "/api/status", headers={"Authorization": f"Bearer guess-{i}"})[0]
             for i in range(25)]
    assert codes[:20] == [401] * 20 and codes[-1] == 429
    right = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
    assert _reply(live.server, "GET", "/api/status", headers=right)[0] == 429  # the address waits, even if right


def test_https_with_the_coordinators_certificate(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "certs")
    live = _start(tmp_path, token=DASHBOARD_TOKEN, tls=DashboardTLS(certs["server"], certs["server_key"]))
    try:
        assert live.server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        status, _, body = _reply(live.server, "GET", "/api/status", context=context,
                                 headers={"Authorization": f"Bearer {DASHBOARD_TOKEN}"})
        assert status == 200 and json.loads(body)["job"] == "api-test"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        headers = _reply(live.server, "POST", "/login", context=context, headers=form,
                         body=f"token={DASHBOARD_TOKEN}".encode())[1]
        assert "Secure" in headers["set-cookie"]
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # plaintext on the TLS port
            _reply(live.server, "GET", "/api/status")
        assert _reply(live.server, "GET", "/api/status", context=context)[0] == 401  # TLS replaces no token
    finally:
        live.server.close()


def test_unsafe_settings_are_refused_in_one_line(tmp_path: Path) -> None:
    view = JobView(INFO, tmp_path / "metrics.jsonl")
    with pytest.raises(DashboardError, match="--dashboard-token"):
        DashboardServer(view, host="0.0.0.0", port=0)
    with pytest.raises(DashboardError, match=r"0\.\.65535"):
        DashboardServer(view, port=70000)
    busy = DashboardServer(view, port=0)
    busy.start()
    try:
        with pytest.raises(OSError, match="cannot serve the dashboard"):
            DashboardServer(view, port=busy.port).start()
    finally:
        busy.close()
    other = DashboardServer(view, host="0.0.0.0", port=0, token=DASHBOARD_TOKEN)  # allowed with a token
    other.start()
    other.close()


def test_many_viewers_cost_one_build_a_second_but_the_end_shows_at_once(tmp_path: Path) -> None:
    view = JobView(INFO, tmp_path / "metrics.jsonl", refresh_s=3600.0)
    engine = EngineAttributes(1, "train")
    view.attach(engine)
    first = view.status()
    engine.activity = "evaluating"
    assert view.status() is first  # within refresh_s: the same document, not rebuilt
    server = DashboardServer(view, port=0)
    server.start()
    try:
        assert server.fragment(first) is server.fragment(first)  # rendered once per document
        view.finish()
        status, _, body = _reply(server, "GET", "/api/status")
        assert status == 200 and json.loads(body)["status"] == "stopped"  # the end, not the cached "running"
    finally:
        server.close()
