"""A short real job with its dashboard on: a coordinator process and client processes over loopback.

Shared by the API test (slow) and the browser test (long). A tiny random BERT
keeps rounds to seconds; the coordinator lingers after the job so a watcher
can read the final state, and the caller stops it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.harness import TOKENS, disjoint_shards, start_client, start_coordinator, tail, wait_all, write_job

DASHBOARD_TOKEN = "dash-3c9e-a17f"
JOB = """
[job]
name = "dashboard-e2e"
mode = "lora"
rounds = {rounds}
clients_per_round = {clients}
min_clients = {clients}
round_timeout_s = 300
heartbeat_timeout_s = 60
sample_grace_s = 60
seed = 0

[model]
path = "{model}"
max_length = 32

[data]
validation = "@VALIDATION@"
validation_max_examples = 200

[train]
local_steps = {steps}
batch_size = 8
lr = 3e-3

[lora]
r = 4
alpha = 8

[enrollment]
tokens_file = "tokens.txt"
"""


@dataclass
class LiveJob:
    folder: Path
    output: Path
    coordinator: subprocess.Popen
    address: str
    url: str
    shards: list[Path]
    clients: list[subprocess.Popen] = field(default_factory=list)

    def start_clients(self) -> None:
        for i, shard in enumerate(self.shards):
            self.clients.append(start_client(self.address, shard, TOKENS[i], self.folder / f"client{i}",
                                             "--name", f"party-{i}"))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.output / "metrics.jsonl").read_text().splitlines()]

    def logs(self) -> str:
        return tail(self.folder / "run.coordinator.log") + "\n" + tail(self.folder / "client0.log")

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url.rstrip("/") + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float, log: Path) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited early:\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear")


@contextmanager
def live_job(folder: Path, model: Path, *, clients: int = 2, rounds: int = 2, steps: int = 5,
             token: str | None = DASHBOARD_TOKEN) -> Iterator[LiveJob]:
    """Start the coordinator (clients are the caller's to start); stop everything on the way out."""
    job = write_job(folder, JOB.format(rounds=rounds, clients=clients, steps=steps, model=model))
    shards = disjoint_shards(folder, clients=clients, per_client=200)
    output = folder / "run"
    extra = ["--dashboard-port", "0", "--linger-s", "120", *(["--dashboard-token", token] if token else [])]
    coordinator, address = start_coordinator(job, output, *extra)
    live = None
    try:
        url = _wait_for_file(output / "dashboard", coordinator, 300, folder / "run.coordinator.log")
        live = LiveJob(folder, output, coordinator, address, url, shards)
        yield live
    finally:
        coordinator.terminate()  # it lingers after the job; the test has read what it needed
        procs = [coordinator, *(live.clients if live else [])]
        wait_all(procs, timeout_s=60)
