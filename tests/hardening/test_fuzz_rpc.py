"""Fuzzing every Coordinator RPC (a few hundred inputs here; ``python -m simulations.harness.fuzz_rpc`` runs 10,000).

The contract: every input gets OK or a precise refusal, never UNKNOWN/INTERNAL
from fedsite code, no handler or round logs a traceback, the round engine that
aggregates the replies keeps the global model finite and within the norm
bound, and health is SERVING after.
Two bugs the fuzzer found (a non-ASCII task id, a deeply nested JSON header)
are fixed; their exact inputs stay below as regression tests, and the
property test tolerates no escape at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from simulations.harness.fuzz_rpc import (
    GRPC_DESERIALIZE_DETAIL,
    Case,
    Finding,
    FuzzReport,
    FuzzService,
    Outcome,
    call,
    fuzz,
    reply_blob,
    run_one,
    verdict,
)

KNOWN_BUGS: tuple[str, ...] = ()  # signatures of open bugs the property test tolerates: none


def _known(finding: Finding) -> bool:
    text = finding.details + "".join(finding.tracebacks)
    return any(sig in text for sig in KNOWN_BUGS)


@pytest.fixture
def service() -> Iterator[FuzzService]:
    svc = FuzzService.start()
    yield svc
    svc.close()


def test_fuzz_every_rpc_gets_a_precise_status_and_the_server_stays_up() -> None:
    report = fuzz(examples=300, seed=1)
    assert report.inputs == 300
    assert set(report.by_method) == {"Enroll", "FetchPackage", "PollTask", "FetchTask", "Upload", "Heartbeat"}
    # the fuzzer must reach past authentication and validation, or it proves nothing
    assert report.codes["OK"] > 0 and report.codes["INVALID_ARGUMENT"] > 0 and report.codes["PERMISSION_DENIED"] > 0
    # ... and into the round engine: hostile reports were aggregated or refused there, never crashing it
    assert report.engine_rounds > 10 and report.engine_rejections > 0
    assert report.serving_after and report.valid_upload_after
    new = [f for f in report.findings if not _known(f)]
    assert not new, new[0]


def test_the_oracle_flags_an_unknown_status(service: FuzzService) -> None:
    """The check itself can fail: gRPC's framing INTERNAL is only excused for bytes that do not parse."""
    garbage = Case("Enroll", raw=(b"\xff\xff\xff",))
    assert call(service, garbage).code == grpc.StatusCode.INVALID_ARGUMENT  # fedsite parses requests itself now
    internal = Outcome(grpc.StatusCode.INTERNAL, GRPC_DESERIALIZE_DETAIL)
    assert verdict(garbage, internal) == "framing"
    parseable = Case("Enroll", raw=(b"",))  # an empty EnrollRequest parses fine
    assert verdict(parseable, internal) == "bad"


def _single(service: FuzzService, case: Case) -> Finding | None:
    return run_one(service, case, FuzzReport())


@pytest.mark.parametrize("method", ["FetchTask", "Upload"])
def test_non_ascii_task_id_is_refused_precisely(service: FuzzService, method: str) -> None:
    recipe = (("valid", "é", "zero") if method == "FetchTask" else
              ("valid", "é", ("valid",), "right", "right", 1, (), "in-order"))
    assert _single(service, Case(method, recipe=recipe)) is None
    assert service.serving()


@pytest.mark.parametrize("where", ["meta", "outer"])
def test_deeply_nested_reply_header_is_invalid_argument(service: FuzzService, where: str) -> None:
    assert reply_blob(1, ("deep", where, 100_000))  # builds; the server is what must cope
    recipe = ("valid", "current", ("deep", where, 100_000), "right", "right", 1, (), "in-order")
    assert _single(service, Case("Upload", recipe=recipe)) is None
    assert service.serving()


def test_hostile_report_values_reach_the_engine_and_are_refused_by_name(service: FuzzService) -> None:
    """The config values inside a well-formed reply: before, "lots" or Infinity in num_examples ended the engine."""
    for report, value in (({"num_examples": "lots"}, 0.1), ({"num_examples": float("inf")}, 0.1),
                          ({"train_loss": "x"}, 0.1), ({"num_examples": 1e308}, 0.1), ({}, 1e30)):
        recipe = ("valid", "current", ("report", report, value), "right", "right", 1, (), "in-order")
        assert _single(service, Case("Upload", recipe=recipe)) is None
    deadline = time.monotonic() + 60
    while service.engine_rejections < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    records = [json.loads(line) for line in (service.workdir / "metrics.jsonl").read_text().splitlines()]
    reasons = " | ".join(r for record in records for r in record.get("reject_reasons", {}).values())
    for expected in ("num_examples must be a number", "num_examples must be finite", "train_loss must be a number",
                     "num_examples must be an integer", "update norm"):
        assert expected in reasons, reasons
    assert not service.engine_violations and service.serving()
