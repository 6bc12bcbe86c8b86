"""The Prometheus endpoint over real HTTP on loopback, fed real round records and a real registry/servicer.

The exposition is parsed here by an independent reader of the text format
(one regex per line kind, label unescaping), not by the renderer's own code.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from coordinator.mailbox import Mailbox
from coordinator.prometheus import CONTENT_TYPE, CoordinatorMetrics, MetricsServerError
from coordinator.registry import ClientRegistry
from coordinator.server import start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(type per family, value per (name, labels)); fails on any malformed line or misplaced TYPE."""
    types: dict[str, str] = {}
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("counter", "gauge")
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"malformed line {line!r}"
        name, labels_text, value = match.groups()
        assert name in types, f"sample {name} before its TYPE"
        labels = {k: v.encode().decode("unicode_escape") for k, v in LABEL.findall(labels_text or "")}
        values[(name, frozenset(labels.items()))] = float(value)
    return types, values


def get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def v(values: dict[tuple[str, frozenset[tuple[str, str]]], float], family: str, /, **labels: str) -> float:
    return values[(family, frozenset(labels.items()))]


@pytest.fixture
def live() -> Iterator[tuple[CoordinatorMetrics, int, pb_grpc.CoordinatorStub]]:
    registry = ClientRegistry.from_tokens(["t1", "t2", "t3"])
    servicer = CoordinatorServicer(job_name='job "q"', registry=registry,
                                   mailbox=Mailbox(registry, heartbeat_timeout_s=30), package=PackageBlob(b"p", "0"))
    server = start_server(servicer, "127.0.0.1:0")
    metrics = CoordinatorMetrics('job "q"', registry=registry, servicer=servicer, heartbeat_timeout_s=30, mode="lora")
    port = metrics.serve(0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield metrics, port, pb_grpc.CoordinatorStub(channel)
    channel.close()
    metrics.close()
    server.stop(0)


Live = tuple[CoordinatorMetrics, int, pb_grpc.CoordinatorStub]


def test_scrape_reflects_rounds_clients_and_refusals(live: Live) -> None:
    metrics, port, stub = live
    status, kind, text = get(port)
    assert status == 200 and kind == CONTENT_TYPE
    types, values = parse(text)
    assert v(values, "fedsite_job_info", job='job "q"', mode="lora") == 1
    assert v(values, "fedsite_rounds_completed_total") == 0 and v(values, "fedsite_clients_enrolled") == 0
    assert types["fedsite_bytes_up_total"] == "counter" and types["fedsite_clients_active"] == "gauge"

    stub.Enroll(pb.EnrollRequest(token="t1"), timeout=5)
    stub.Enroll(pb.EnrollRequest(token="t2"), timeout=5)
    for bad in ("nope", "wrong"):
        with pytest.raises(grpc.RpcError):
            stub.Enroll(pb.EnrollRequest(token=bad), timeout=5)
    metrics.observe_round({"round": 0, "val_accuracy": 0.1})  # the baseline is not a round
    metrics.observe_round({"round": 1, "status": "ok", "sampled_clients": 2, "completed_clients": 2,
                           "dropped_clients": 0, "bytes_down": 1000, "bytes_up": 800, "epsilon_local_max": 1.5,
                           "epsilon_client": 0.7, "val_accuracy": 0.25, "train_loss": 2.5, "seconds": 3.0})
    metrics.round_hook(2, {"status": "failed", "sampled_clients": 2, "completed_clients": 0, "dropped_clients": 2,
                           "bytes_down": 500, "bytes_up": 0, "epsilon_local_max": float("nan"),
                           "val_accuracy": 0.25})
    _, _, text = get(port)
    _, values = parse(text)
    assert v(values, "fedsite_rounds_total", status="ok") == 1
    assert v(values, "fedsite_rounds_total", status="failed") == 1
    assert v(values, "fedsite_rounds_completed_total") == 1 and v(values, "fedsite_round") == 2
    assert v(values, "fedsite_round_status", status="failed") == 1
    assert v(values, "fedsite_round_status", status="ok") == 0
    assert v(values, "fedsite_round_dropped_clients") == 2 and v(values, "fedsite_round_completed_clients") == 0
    assert v(values, "fedsite_bytes_down_total") == 1500 and v(values, "fedsite_bytes_up_total") == 800
    assert v(values, "fedsite_epsilon_local_max") == 1.5  # a NaN report does not erase the spent budget
    assert v(values, "fedsite_epsilon_client") == 0.7
    assert v(values, "fedsite_round_metric", name="val_accuracy") == 0.25
    assert ("fedsite_round_metric", frozenset({("name", "train_loss")})) not in values  # round 2 had none
    assert v(values, "fedsite_clients_enrolled") == 2 and v(values, "fedsite_clients_active") == 2
    assert v(values, "fedsite_rejected_rpcs_total") == 2
    assert get(port, "/nothing")[0] == 404 and get(port, "/")[0] == 200


def test_port_in_use_is_a_clear_error(live: Live) -> None:
    _, port, _ = live
    with pytest.raises(MetricsServerError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        CoordinatorMetrics("other").serve(port)
