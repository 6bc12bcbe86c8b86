"""Rate limits: a token bucket per client and per address, and what a flooding caller sees over gRPC."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.mailbox import Mailbox
from coordinator.ratelimit import RateLimiter
from coordinator.registry import ClientRegistry
from coordinator.server import start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc


def test_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # keys are independent
    time.sleep(0.6)  # 2 calls/s: one call back, not more
    assert limiter.allow("a") and not limiter.allow("a")
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


def test_idle_keys_are_forgotten_when_there_are_too_many() -> None:
    limiter = RateLimiter(rate=1000.0, burst=1, max_keys=10)
    for i in range(10):
        limiter.allow(f"k{i}")
    time.sleep(0.01)  # every bucket is full again: idle
    limiter.allow("new")
    assert len(limiter._buckets) == 1


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_a_flooding_client_is_throttled_alone_and_the_service_stays_up(tmp_path: Path) -> None:
    registry = ClientRegistry.from_tokens(["flood", "calm"])
    servicer = CoordinatorServicer(job_name="t", registry=registry, mailbox=Mailbox(registry, heartbeat_timeout_s=30),
                                   package=PackageBlob(b"p", "0"), calls_per_client=RateLimiter(1.0, 5),
                                   failed_enrolments_per_address=RateLimiter(0.1, 3))
    server = start_server(servicer, "127.0.0.1:0")
    server.set_serving(True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        flood = stub.Enroll(pb.EnrollRequest(token="flood"), timeout=5).credentials
        codes = []
        for _ in range(8):
            try:
                stub.PollTask(pb.PollRequest(credentials=flood), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes[:5] == [grpc.StatusCode.OK] * 5
        assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        calm = stub.Enroll(pb.EnrollRequest(token="calm"), timeout=5).credentials
        assert stub.PollTask(pb.PollRequest(credentials=calm), timeout=5).kind == pb.Task.WAIT
        # guessing tokens: three wrong ones, then this address is refused even with a good token
        for _ in range(3):
            assert _code(lambda: stub.Enroll(pb.EnrollRequest(token="guess"), timeout=5)) \
                == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: stub.Enroll(pb.EnrollRequest(token="calm"), timeout=5)) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert servicer.rate_limited == 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        server.stop(0)
