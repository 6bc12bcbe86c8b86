"""Issue 15's attacks against a real coordinator over loopback, from real processes.

Two honest clients and one attacker built on fedsite's own client (tests/hardening/hostile_client.py), which
sends one attack per round. Meanwhile this test holds 200 idle Upload streams open without a session (topping
them up as the coordinator cancels or refuses them), checks health every second, and starts a second client
with an honest client's token. What must hold: the coordinator stays up and exits 0, every attack is refused
or bounded with a named reason in metrics.jsonl, the honest rounds go on, health answers throughout, the
token's second client is told the token is in use, and the exported model is finite.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.server import SERVICE_NAME
from tests.e2e.harness import (
    TOKENS,
    disjoint_shards,
    start_client,
    start_coordinator,
    tail,
    wait_all,
    wait_for_text,
    write_job,
)

pytestmark = pytest.mark.slow

JOB = """
[job]
name = "e2e-hostile"
rounds = @ROUNDS@
clients_per_round = 3
min_clients = 2
round_timeout_s = 120
heartbeat_timeout_s = 10
sample_grace_s = 120
seed = 0
[model]
path = "@MODEL@"
max_length = 32
[data]
validation = "@VALIDATION@"
validation_max_examples = 100
[train]
local_steps = 2
batch_size = 8
lr = 1e-2
[lora]
r = 4
[privacy.secure_aggregation]
enabled = @SECURE@
[enrollment]
tokens_file = "tokens.txt"
"""


class Flood:
    """Up to ``size`` Upload streams open at once without a session and without a message, topped up forever."""

    def __init__(self, address: str, size: int = 200) -> None:
        # its own connection, as a real attacker has (gRPC would otherwise share one with the health checks)
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.size = size
        self.stop = threading.Event()
        self.codes: Counter[str] = Counter()
        self._open: list[grpc.Future] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open_one(self, method: grpc.StreamUnaryMultiCallable) -> grpc.Future:
        """One silent stream; its request generator (gRPC reads it in a thread of its own) ends with the call."""
        ended = threading.Event()

        def silence() -> Iterator[bytes]:
            ended.wait(600)
            return
            yield b""  # pragma: no cover - a generator that never yields

        call = method.future(silence(), timeout=600)
        call.add_done_callback(lambda _: ended.set())
        return call

    def _run(self) -> None:
        method = self.channel.stream_unary(f"/{SERVICE_NAME}/Upload")
        while not self.stop.is_set():
            still = []
            for call in self._open:
                if call.done():
                    exc = call.exception()
                    self.codes[exc.code().name if isinstance(exc, grpc.RpcError) else "OK"] += 1
                else:
                    still.append(call)
            self._open = still + [self._open_one(method) for _ in range(self.size - len(still))]
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        for call in self._open:
            call.cancel()
        self.channel.close()


class HealthWatch:
    """A health check every second while the coordinator runs; the slowest answer and any failure are kept."""

    def __init__(self, address: str, alive: Callable[[], bool]) -> None:
        self.alive = alive
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.slowest = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        while not self.stop.wait(1.0) and self.alive():
            started = time.monotonic()
            try:
                answer = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
            except grpc.RpcError as exc:
                answer = exc.code().name
                self.failures.append(f"{time.strftime('%H:%M:%S')} {answer}: {exc.details()}")
            if not self.alive():  # the coordinator stopped meanwhile: its last answers do not count
                return
            self.statuses[answer] += 1
            self.slowest = max(self.slowest, time.monotonic() - started)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        self.channel.close()


def _run(tiny_bert_dir: Path, tmp_path: Path, *, secure: bool, attacks: list[str]) -> dict[str, Any]:
    job = write_job(tmp_path, JOB.replace("@MODEL@", str(tiny_bert_dir)).replace("@ROUNDS@", str(len(attacks)))
                    .replace("@SECURE@", "true" if secure else "false"))
    shards = disjoint_shards(tmp_path, clients=4, per_client=40, seed=3)
    out = tmp_path / "run"
    coordinator, address = start_coordinator(job, out)
    # the coordinator says "job complete" before it stops listening: from then on it may stop answering
    flood = Flood(address)
    health = HealthWatch(address, alive=lambda: coordinator.poll() is None
                         and "job complete" not in (tmp_path / "run.coordinator.log").read_text(errors="replace"))
    try:
        honest = [start_client(address, shards[0], TOKENS[0], tmp_path / "honest0")]
        # a second client with honest0's token while honest0 holds it (and no round can start: 3 are needed)
        assert wait_for_text(tmp_path / "honest0.log", "enrolled as", 300), tail(tmp_path / "honest0.log")
        twin = start_client(address, shards[3], TOKENS[0], tmp_path / "twin")
        (twin_code,) = wait_all([twin], timeout_s=300)
        honest.append(start_client(address, shards[1], TOKENS[1], tmp_path / "honest1"))
        hostile = start_client(address, shards[2], TOKENS[2], tmp_path / "hostile",
                               program=("-m", "tests.hardening.hostile_client", ",".join(attacks), "client"))
        codes = wait_all([coordinator, *honest, hostile], timeout_s=900)
    finally:
        flood.close()
        health.close()
    log = (tmp_path / "run.coordinator.log").read_text()
    assert codes == [0, 0, 0, 0], (codes, tail(tmp_path / "run.coordinator.log"), tail(tmp_path / "honest0.log"))
    assert "Traceback" not in log, log[-5000:]
    # the twin was told, in one line, and never disturbed honest0
    twin_last = tail(tmp_path / "twin.log", 1)
    assert twin_code == 2 and "token in use by another client since" in twin_last, (twin_code, twin_last)
    # health answered throughout the flood; the flood itself was refused or cut off, never served
    assert health.slowest < 10 and set(health.statuses) <= {"SERVING", "NOT_SERVING"}, (health.statuses,
                                                                                       health.failures)
    assert health.statuses["SERVING"] > 0
    assert flood.codes["RESOURCE_EXHAUSTED"] > 100 and "OK" not in flood.codes, flood.codes
    records = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return {"records": records, "hostile": _client_id(tmp_path / "hostile")}


def _client_id(state: Path) -> str:
    return str(json.loads((state / "credentials.json").read_text())["client_id"])


def test_plain_attacks_are_refused_or_bounded_and_the_job_goes_on(tiny_bert_dir: Path, tmp_path: Path) -> None:
    attacks = ["lots", "inf", "nan-loss", "huge", "scale", "bound", "honest"]
    result = _run(tiny_bert_dir, tmp_path, secure=False, attacks=attacks)
    records, hostile = result["records"], result["hostile"]
    refused = {1: "num_examples must be a number", 2: "num_examples must be finite", 3: "train_loss must be finite",
               4: "num_examples must be an integer", 5: "update norm"}
    for round_id, reason in refused.items():
        record = records[round_id]
        assert record["status"] == "ok" and record["completed_clients"] == 2, record
        assert reason in record["reject_reasons"][hostile], record["reject_reasons"]
    bounded = records[6]  # an update just under the norm bound with 10^9 examples: in, capped and bounded
    assert bounded["status"] == "ok" and bounded["completed_clients"] == 3 and bounded["examples_capped"] == [hostile]
    assert records[7]["status"] == "ok" and records[7]["completed_clients"] == 3
    for record in records.values():
        assert torch.isfinite(torch.tensor(record["val_loss"]))


def test_secure_weight_attacks_refuse_their_round_or_are_bounded(tiny_bert_dir: Path, tmp_path: Path) -> None:
    attacks = ["negative", "declares-less", "declare-8", "max", "honest"]
    result = _run(tiny_bert_dir, tmp_path, secure=True, attacks=attacks)
    records, hostile = result["records"], result["hostile"]
    for round_id in (1, 2):  # a weight in the secure sum that disagrees with the declared one: the round is refused
        assert records[round_id]["status"] == "failed", records[round_id]
        assert "misreported its weight" in records[round_id]["failure"]
    declared_8 = records[3]  # refused alone, as a dropout: the others are aggregated
    assert declared_8["status"] == "ok" and declared_8["completed_clients"] == 2
    assert "secagg_weight must be in [0, 1]" in declared_8["reject_reasons"][hostile]
    assert records[4]["status"] == "ok" and records[4]["completed_clients"] == 3  # bounded by the clipping range
    assert records[5]["status"] == "ok" and records[5]["completed_clients"] == 3
