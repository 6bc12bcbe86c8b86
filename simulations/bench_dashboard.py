"""What the live dashboard costs the coordinator: bench_load's round, with and without viewers, side by side.

    python -m simulations.bench_dashboard [--clients 200] [--repeats 3] [--viewers 5] [--interval-s 0.5]

Each repeat runs bench_load's round (no client vanishing on purpose, a 5%
share of rejected replies) twice, in alternating order: once plain,
once with a dashboard on the coordinator's registry and engine and
``--viewers`` threads that each fetch, every ``--interval-s``, the page's
fragment or ``/api/status`` in turn (5 viewers every 0.5 s is 10 requests a
second, 20 times what one open page asks: it polls every 2 s). It
reports the round's seconds and the clients' RPC latency both ways, their
ratios (median over repeats), how many dashboard requests were served during
the rounds, and what one request costs on its own (status + render, CPU
seconds on this thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.bench_load import make_tiny_bert, run_load


class Viewers:
    """Threads that poll the dashboard as open pages do, only faster; count and time every request."""

    def __init__(self, url: str, count: int, interval_s: float) -> None:
        self.url, self.count, self.interval_s = url.rstrip("/"), count, interval_s
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"viewer-{i}", daemon=True) for i in range(count)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        paths = ("/fragment", "/api/status")
        i = 0
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url + paths[i % 2], timeout=30) as reply:
                    reply.read()
                with self._lock:
                    self.latencies.append(time.perf_counter() - start)
            except OSError:
                with self._lock:
                    self.failures += 1
            i += 1
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _with_dashboard(viewers: int, interval_s: float, sink: dict[str, Any]) -> Callable[[Any, Any], Callable[[], None]]:
    def on_ready(job: Any, registry: Any) -> Callable[[], None]:
        from coordinator.dashboard import JobInfo, JobView
        from coordinator.dashboard.server import DashboardServer

        view = JobView(JobInfo.from_config(job.config), job.output_dir / "metrics.jsonl", registry=registry)
        view.attach(job.engine)
        server = DashboardServer(view, port=0)
        pool = Viewers(server.start(), viewers, interval_s)
        pool.start()
        sink["view"] = view

        def after() -> None:
            pool.stop()
            server.close()
            sink["requests"] = len(pool.latencies)
            sink["failures"] = pool.failures
            sink["latency_ms_p50"] = 1000 * statistics.median(pool.latencies) if pool.latencies else None

        return after

    return on_ready


def request_cost_ms(view: Any, repeats: int = 50) -> dict[str, float]:
    """CPU milliseconds for one /api/status document and one rendered fragment, in this thread."""
    from coordinator.dashboard.render import render_fragment

    view.status()  # warm the metrics cache
    start = time.thread_time()
    for _ in range(repeats):
        status = view.status()
    status_ms = 1000 * (time.thread_time() - start) / repeats
    start = time.thread_time()
    for _ in range(repeats):
        render_fragment(status)
    return {"status_ms": round(status_ms, 3), "render_ms": round(1000 * (time.thread_time() - start) / repeats, 3)}


def run(clients: int, repeats: int, viewers: int, interval_s: float, workdir: Path) -> dict[str, Any]:
    model = make_tiny_bert(workdir / "tiny-bert")
    plain: list[dict[str, Any]] = []
    watched: list[dict[str, Any]] = []
    last_view: Any = None
    for repeat in range(repeats):
        order = ("plain", "watched") if repeat % 2 == 0 else ("watched", "plain")
        for mode in order:
            sink: dict[str, Any] = {}
            hook = _with_dashboard(viewers, interval_s, sink) if mode == "watched" else None
            # no client vanishes on purpose: the round then measures work, not a heartbeat timeout's wait
            # (which is also generous, so a loaded machine does not drop honest clients)
            report = run_load(clients, workdir / f"{repeat}-{mode}", model=model, on_ready=hook,
                              drop_fraction=0.0, heartbeat_timeout_s=60.0)
            summary = report.summary()
            if summary["status"] != "ok" or report.errors:
                raise RuntimeError(f"round did not complete cleanly ({mode}): {summary}")
            row = {"round_seconds": report.round_seconds,
                   "rpc_p50_ms": summary["latency_ms"]["all"]["p50"], "rpc_p99_ms": summary["latency_ms"]["all"]["p99"],
                   **{k: v for k, v in sink.items() if k != "view"}}
            (watched if mode == "watched" else plain).append(row)
            last_view = sink.get("view", last_view)
            print(f"repeat {repeat} {mode}: {json.dumps(row)}", file=sys.stderr, flush=True)

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in rows)

    ratios = [w["round_seconds"] / p["round_seconds"] for p, w in zip(plain, watched, strict=True)]
    return {
        "clients": clients, "repeats": repeats, "viewers": viewers, "interval_s": interval_s,
        "requests_per_s": round(viewers / interval_s, 2) if interval_s else None,
        "round_seconds": {"plain": round(median(plain, "round_seconds"), 3),
                          "watched": round(median(watched, "round_seconds"), 3)},
        "round_seconds_ratio_watched_to_plain": {"median": round(statistics.median(ratios), 4),
                                                 "each": [round(r, 4) for r in ratios]},
        **{key: {"plain": round(median(plain, key), 2), "watched": round(median(watched, key), 2)}
           for key in ("rpc_p50_ms", "rpc_p99_ms")},
        "dashboard_requests_per_round": [w.get("requests") for w in watched],
        "dashboard_failures": sum(int(w.get("failures") or 0) for w in watched),
        "dashboard_latency_ms_p50": [w.get("latency_ms_p50") for w in watched],
        "request_cost": request_cost_ms(last_view) if last_view is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--interval-s", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        result = run(args.clients, args.repeats, args.viewers, args.interval_s, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
