"""What the live dashboard costs the coordinator: bench.load's round, with and without viewers, side by side.

    python -m simulations.bench.dashboard [--clients 200] [--repeats 3] [--viewers 5] [--interval-s 0.5]

Each repeat runs bench.load's round (no client vanishing on purpose, a 5%
share of rejected replies) twice, in alternating order: once plain, once
with a dashboard on the coordinator's registry and engine and, in a process
of their own as browsers would be, ``--viewers`` threads that each fetch,
every ``--interval-s``, the page's fragment or ``/api/status`` in turn
(``--viewers 1 --interval-s 2`` is one open page; 5 every 0.5 s is 20 times
that). It reports, median over repeats: the round's wall seconds, the
coordinator process's CPU seconds over the round (its load clients included,
the same in both arms; on a shared machine the wall clock also measures the
neighbours), the clients' RPC latency, their ratios; and, measured directly,
the CPU seconds the dashboard's threads spent answering during the round and
their share of the coordinator's, how many requests they served, and what
one request costs on its own (status + render, CPU milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

RPCS = ("PollTask", "FetchTask", "Upload")


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


def viewer_process(url: str, count: int, interval_s: float) -> subprocess.Popen:
    """The viewers in a process of their own, as browsers are: the coordinator's process pays only for
    serving. Returns once they poll; they go on until stdin closes, then print {"latencies", "failures"}."""
    proc = subprocess.Popen([sys.executable, "-m", "simulations.bench.dashboard", "--viewer-of", url,
                             "--viewers", str(count), "--interval-s", str(interval_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "polling":
        raise RuntimeError("the viewers' process did not start")
    return proc


def _serve_as_viewers(url: str, count: int, interval_s: float) -> int:
    pool = Viewers(url, count, interval_s)
    pool.start()
    print("polling", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    pool.stop()
    print(json.dumps({"latencies": pool.latencies, "failures": pool.failures}))
    return 0


def _round_hook(viewers: int, interval_s: float, sink: dict[str, Any]) -> Callable[[Any, Any], Callable[[], None]]:
    """bench.load's on_ready: with ``viewers``, a dashboard and its viewers; always, the coordinator process's
    CPU seconds over the round (its 200 load clients included, the same in both arms)."""

    def on_ready(job: Any, registry: Any) -> Callable[[], None]:
        server, pool = None, None
        if viewers:
            from coordinator.dashboard import JobInfo, JobView
            from coordinator.dashboard.server import DashboardServer

            view = JobView(JobInfo.from_config(job.config), job.output_dir / "metrics.jsonl", registry=registry)
            view.attach(job.engine)
            server = DashboardServer(view, port=0)
            pool = viewer_process(server.start(), viewers, interval_s)
            sink["view"] = view
        cpu_start = time.process_time()

        def after() -> None:
            sink["cpu_seconds"] = time.process_time() - cpu_start
            if pool is None or server is None:
                return
            out, _ = pool.communicate(timeout=120)  # closes its stdin: it stops and reports
            server.close()
            sink["dashboard_cpu_seconds"] = server.cpu_seconds
            seen = json.loads(out)
            sink["requests"] = len(seen["latencies"])
            sink["failures"] = seen["failures"]
            sink["latency_ms_p50"] = 1000 * statistics.median(seen["latencies"]) if seen["latencies"] else None

        return after

    return on_ready


def request_cost_ms(view: Any, repeats: int = 50) -> dict[str, float]:
    """CPU milliseconds for one /api/status document and one rendered fragment, in this thread."""
    from coordinator.dashboard.render import render_fragment

    view.refresh_s = 0.0  # build the document every time: the cost of one build, not of the cache
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
    from simulations.bench.load import make_tiny_bert, run_load  # here: the viewers' process needs no torch

    model = make_tiny_bert(workdir / "tiny-bert")
    plain: list[dict[str, Any]] = []
    watched: list[dict[str, Any]] = []
    last_view: Any = None
    for repeat in range(repeats):
        order = ("plain", "watched") if repeat % 2 == 0 else ("watched", "plain")
        for mode in order:
            sink: dict[str, Any] = {}
            hook = _round_hook(viewers if mode == "watched" else 0, interval_s, sink)
            # no client vanishes on purpose: the round then measures work, not a heartbeat timeout's wait
            # (which is also generous, so a loaded machine does not drop honest clients)
            report = run_load(clients, workdir / f"{repeat}-{mode}", model=model, on_ready=hook,
                              drop_fraction=0.0, heartbeat_timeout_s=60.0)
            summary = report.summary()
            if summary["status"] != "ok" or report.errors:
                raise RuntimeError(f"round did not complete cleanly ({mode}): {summary}")
            latency = summary["latency_ms"]
            row = {"round_seconds": report.round_seconds,
                   "rpc_p50_ms": latency["all"]["p50"], "rpc_p99_ms": latency["all"]["p99"],
                   **{f"{m}_p50_ms": latency[m]["p50"] for m in RPCS if m in latency},
                   **{k: v for k, v in sink.items() if k != "view"}}
            (watched if mode == "watched" else plain).append(row)
            last_view = sink.get("view", last_view)
            print(f"repeat {repeat} {mode}: {json.dumps(row)}", file=sys.stderr, flush=True)

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in rows)

    ratios = [w["round_seconds"] / p["round_seconds"] for p, w in zip(plain, watched, strict=True)]
    cpu_ratios = [w["cpu_seconds"] / p["cpu_seconds"] for p, w in zip(plain, watched, strict=True)]
    return {
        "clients": clients, "repeats": repeats, "viewers": viewers, "interval_s": interval_s,
        "requests_per_s": round(viewers / interval_s, 2) if interval_s else None,
        "round_seconds": {"plain": round(median(plain, "round_seconds"), 3),
                          "watched": round(median(watched, "round_seconds"), 3)},
        "round_seconds_ratio_watched_to_plain": {"median": round(statistics.median(ratios), 4),
                                                 "each": [round(r, 4) for r in ratios]},
        "coordinator_cpu_seconds": {"plain": round(median(plain, "cpu_seconds"), 3),
                                    "watched": round(median(watched, "cpu_seconds"), 3)},
        "coordinator_cpu_ratio_watched_to_plain": {"median": round(statistics.median(cpu_ratios), 4),
                                                   "each": [round(r, 4) for r in cpu_ratios]},
        **{key: {"plain": round(median(plain, key), 2), "watched": round(median(watched, key), 2)}
           for key in ("rpc_p50_ms", "rpc_p99_ms", *(f"{m}_p50_ms" for m in RPCS))},
        "dashboard_cpu_seconds_per_round": [round(w["dashboard_cpu_seconds"], 4) for w in watched],
        "dashboard_cpu_share_of_round": round(statistics.median(
            w["dashboard_cpu_seconds"] / w["cpu_seconds"] for w in watched), 5),
        "dashboard_requests_per_round": [w.get("requests") for w in watched],
        "dashboard_failures": sum(int(w.get("failures") or 0) for w in watched),
        "dashboard_latency_ms_p50": [w.get("latency_ms_p50") for w in watched],
        "request_cost": request_cost_ms(last_view) if last_view is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--interval-s", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--viewer-of", default=None, help=argparse.SUPPRESS)  # the viewers' own process
    args = parser.parse_args(argv)
    if args.viewer_of:
        return _serve_as_viewers(args.viewer_of, args.viewers, args.interval_s)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        result = run(args.clients, args.repeats, args.viewers, args.interval_s, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
