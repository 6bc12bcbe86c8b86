"""A Prometheus scrape endpoint for the coordinator (text exposition format 0.0.4, stdlib only).

    fedsite-coordinator serve ... --metrics-port 9100 [--metrics-host 0.0.0.0]

Operators watch a long job from their existing monitoring instead of tailing
``metrics.jsonl``: rounds completed and failed, the last round's status,
clients and accuracy, cumulative bytes, the privacy spent so far (ε), and how
many calls the servicer refused. Round figures come from the same records the
engine writes to ``metrics.jsonl`` (:meth:`CoordinatorMetrics.observe_round`,
called from a round hook); client counts and refused calls are read live from
the registry and the servicer at scrape time, so they are never stale.

No dependency on ``prometheus_client``: the format is a few lines of text and
the server is ``http.server`` in a daemon thread, bound to the host given
(loopback by default, since the endpoint has no authentication).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"


class MetricsServerError(OSError):
    """The metrics endpoint cannot listen on the address asked for."""


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str  # "counter" | "gauge"
    help: str


FAMILIES = {f.name: f for f in (
    _Family("fedsite_job_info", "gauge", "The job this coordinator serves (value is always 1)."),
    _Family("fedsite_rounds_total", "counter", "Rounds finished since this coordinator started, by status."),
    _Family("fedsite_rounds_completed_total", "counter", "Rounds that produced an update (status ok)."),
    _Family("fedsite_round", "gauge", "Number of the last finished round."),
    _Family("fedsite_round_status", "gauge", "1 for the last finished round's status, 0 for the other statuses."),
    _Family("fedsite_round_sampled_clients", "gauge", "Clients sampled in the last round."),
    _Family("fedsite_round_completed_clients", "gauge", "Clients whose update was aggregated in the last round."),
    _Family("fedsite_round_dropped_clients", "gauge", "Clients dropped or rejected in the last round."),
    _Family("fedsite_clients_enrolled", "gauge", "Clients holding a live enrolment."),
    _Family("fedsite_clients_active", "gauge", "Clients heard from within the heartbeat timeout."),
    _Family("fedsite_bytes_down_total", "counter", "Task bytes sent to clients."),
    _Family("fedsite_bytes_up_total", "counter", "Reply bytes received from clients."),
    _Family("fedsite_epsilon_local_max", "gauge", "Largest sample-level DP epsilon any client reported so far."),
    _Family("fedsite_epsilon_client", "gauge", "Client-level DP epsilon of the job so far."),
    _Family("fedsite_rejected_rpcs_total", "counter", "Calls the servicer refused (auth, validation, stale task)."),
    _Family("fedsite_rate_limited_rpcs_total", "counter", "Of those, calls refused by a rate limit."),
    _Family("fedsite_round_metric", "gauge", "Last round's evaluation and training figures, by name."),
    _Family("fedsite_round_seconds", "gauge", "Duration of the last round's phases, by phase."),
)}
ROUND_STATUSES = ("ok", "failed")
ROUND_METRIC_KEYS = ("val_accuracy", "val_loss", "val_perplexity", "train_loss")
ROUND_SECONDS_KEYS = {"seconds_exchange": "exchange", "seconds_train_max": "train_max",
                      "seconds_aggregate": "aggregate", "seconds_eval": "eval", "seconds": "total"}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() or abs(value) >= 1e15 else str(int(value))


def _finite(value: Any) -> float | None:
    """A record value as a float, or None when absent, non-numeric or not finite (never exported)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class CoordinatorMetrics:
    """Collects the coordinator's figures and serves them on ``/metrics``.

    ``registry`` (a ``ClientRegistry``) and ``servicer`` (a
    ``CoordinatorServicer``) are optional and read at scrape time; round
    figures arrive through :meth:`observe_round` (or :meth:`round_hook`, the
    engine's ``round_hooks`` signature).
    """

    def __init__(self, job_name: str = "", *, registry: Any = None, servicer: Any = None,
                 heartbeat_timeout_s: float = 60.0, mode: str = "") -> None:
        self.job_name = job_name
        self.mode = mode
        self.registry = registry
        self.servicer = servicer
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.Lock()
        self._rounds: dict[str, int] = dict.fromkeys(ROUND_STATUSES, 0)
        self._last: dict[str, Any] = {}
        self._bytes_down = 0.0
        self._bytes_up = 0.0
        self._epsilon_local_max: float | None = None
        self._epsilon_client: float | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- input ----------------------------------------------------------------------------

    def observe_round(self, record: dict[str, Any]) -> None:
        """Take one round's record (the dict written to metrics.jsonl). Round 0 (the baseline) is ignored."""
        round_id = record.get("round")
        if not isinstance(round_id, int) or round_id < 1:
            return
        status = str(record.get("status", "ok"))
        with self._lock:
            self._rounds[status] = self._rounds.get(status, 0) + 1
            self._last = dict(record)
            self._bytes_down += _finite(record.get("bytes_down")) or 0.0
            self._bytes_up += _finite(record.get("bytes_up")) or 0.0
            local = _finite(record.get("epsilon_local_max"))
            if local is not None:  # ε only grows; a round where nobody reported keeps the previous value
                self._epsilon_local_max = max(local, self._epsilon_local_max or 0.0)
            client = _finite(record.get("epsilon_client"))
            if client is not None:
                self._epsilon_client = client

    def round_hook(self, round_id: int, record: dict[str, Any]) -> None:
        """The ``RoundEngine.round_hooks`` signature: ``engine.round_hooks.append(metrics.round_hook)``."""
        self.observe_round({**record, "round": round_id})

    # -- output ---------------------------------------------------------------------------

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(family, labels, value) for every sample, in exposition order."""
        out: list[tuple[str, dict[str, str], float]] = []
        with self._lock:
            last, rounds = dict(self._last), dict(self._rounds)
            bytes_down, bytes_up = self._bytes_down, self._bytes_up
            eps_local, eps_client = self._epsilon_local_max, self._epsilon_client
        out.append(("fedsite_job_info", {"job": self.job_name, "mode": self.mode}, 1.0))
        for status, count in sorted(rounds.items()):
            out.append(("fedsite_rounds_total", {"status": status}, float(count)))
        out.append(("fedsite_rounds_completed_total", {}, float(rounds.get("ok", 0))))
        if last:
            out.append(("fedsite_round", {}, float(last["round"])))
            statuses = sorted({*ROUND_STATUSES, str(last.get("status", "ok"))})
            for status in statuses:
                out.append(("fedsite_round_status", {"status": status},
                            1.0 if status == str(last.get("status", "ok")) else 0.0))
            for key, family in (("sampled_clients", "fedsite_round_sampled_clients"),
                                ("completed_clients", "fedsite_round_completed_clients"),
                                ("dropped_clients", "fedsite_round_dropped_clients")):
                value = _finite(last.get(key))
                if value is not None:
                    out.append((family, {}, value))
            for key in ROUND_METRIC_KEYS:
                value = _finite(last.get(key))
                if value is not None:
                    out.append(("fedsite_round_metric", {"name": key}, value))
            for key, phase in ROUND_SECONDS_KEYS.items():
                value = _finite(last.get(key))
                if value is not None:
                    out.append(("fedsite_round_seconds", {"phase": phase}, value))
        enrolled, active = self._client_counts()
        if enrolled is not None:
            out.append(("fedsite_clients_enrolled", {}, float(enrolled)))
        if active is not None:
            out.append(("fedsite_clients_active", {}, float(active)))
        out.append(("fedsite_bytes_down_total", {}, bytes_down))
        out.append(("fedsite_bytes_up_total", {}, bytes_up))
        if eps_local is not None:
            out.append(("fedsite_epsilon_local_max", {}, eps_local))
        if eps_client is not None:
            out.append(("fedsite_epsilon_client", {}, eps_client))
        if self.servicer is not None:
            out.append(("fedsite_rejected_rpcs_total", {}, float(getattr(self.servicer, "errors", 0))))
            out.append(("fedsite_rate_limited_rpcs_total", {}, float(getattr(self.servicer, "rate_limited", 0))))
        return out

    def _client_counts(self) -> tuple[int | None, int | None]:
        if self.registry is None:
            return None, None
        active = len(self.registry.active(self.heartbeat_timeout_s))
        return self.registry.enrolled(), active

    def render(self) -> str:
        """The whole exposition: HELP and TYPE once per family, then its samples."""
        by_family: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family, labels, value in self.samples():
            by_family.setdefault(family, []).append((labels, value))
        lines: list[str] = []
        for name, samples in by_family.items():
            meta = FAMILIES[name]
            lines.append(f"# HELP {name} {meta.help}")
            lines.append(f"# TYPE {name} {meta.kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{label_text}}} {_number(value)}" if labels else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    # -- HTTP -----------------------------------------------------------------------------

    def serve(self, port: int, host: str = DEFAULT_HOST) -> int:
        """Start serving ``/metrics`` on host:port in a daemon thread; returns the bound port (0 = any free)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, kind = metrics.render().encode(), 200, CONTENT_TYPE
                elif path == "/":
                    body, status, kind = b"fedsite coordinator: see /metrics\n", 200, "text/plain"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s would flood the log
                return

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise MetricsServerError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return int(server.server_address[1])

    @property
    def port(self) -> int | None:
        """The port bound (None before :meth:`serve` or after :meth:`close`)."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        """Stop serving and wait briefly for the HTTP thread; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
