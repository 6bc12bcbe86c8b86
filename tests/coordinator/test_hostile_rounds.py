"""Hostile clients inside the round engine: refused with a named reason, or bounded, and the round goes on.

Four honest clients and one hostile one, all real ClientRuntimes (tiny BERT, real WordNet rows) behind the
in-process driver, so every message crosses the wire codec. The hostile runtime trains honestly and then
rewrites what it sends. Each attack's round is compared with the same round run by the four honest clients
alone: a refused reply leaves exactly the honest aggregate; an accepted one moves the global model at most
as far as the documented bound allows (privacy/README.md, "Hostile clients").
(Replies that JSON cannot carry, NaN and Infinity, are sent over real gRPC in tests/hardening.)
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.runtime import ClientRuntime
from coordinator.bounds import plain_update_bound, secure_clipping_range
from coordinator.config import parse_job
from coordinator.job import PreparedJob, prepare_job
from coordinator.strategy import State, update_norm
from localio.data import read_examples
from privacy.secagg.messages import Key
from protos.codec import Message
from simulations.harness.inprocess import InProcessDriver

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"
HONEST = ["c0", "c1", "c2", "c3"]
Tamper = Callable[["Hostile", Message, Message], Message]


class Hostile(ClientRuntime):
    """An honest runtime whose replies (and secure-sum vector) an attack rewrites."""

    tamper: Tamper | None = None
    vector: Callable[[np.ndarray, float], np.ndarray] | None = None

    def handle(self, message: Message) -> Message:
        reply = super().handle(message)
        return self.tamper(self, message, reply) if self.tamper is not None else reply

    def masked_input_vector(self, trained: Message, weight: float, clipping_range: float) -> np.ndarray:
        honest = super().masked_input_vector(trained, weight, clipping_range)
        return self.vector(honest, clipping_range) if self.vector is not None else honest


def _table(model_dir: Path, tmp: Path, *, clients: int, secure: bool) -> dict[str, Any]:
    return {
        "job": {"name": "h", "rounds": 1, "clients_per_round": clients, "min_clients": 3, "seed": 0},
        "model": {"path": str(model_dir), "max_length": 32},
        "data": {"validation": str(VALIDATION), "validation_max_examples": 50},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
        "lora": {"r": 4},
        "privacy": {"secure_aggregation": {"enabled": secure}},
    }


@pytest.fixture(scope="module")
def base(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One job package for every run of this module (building it is the slow part)."""
    folder = tmp_path_factory.mktemp("hostile-base")
    prepare_job(parse_job(_table(tiny_bert_dir, folder, clients=5, secure=False), folder), folder / "out")
    return folder


def _prepare(base: Path, tmp: Path, model_dir: Path, *, clients: int, secure: bool) -> PreparedJob:
    out = tmp / "out"
    out.mkdir(parents=True)
    for name in ("package.tar", "package-slim.tar"):
        shutil.copy(base / "out" / name, out / name)
    shutil.copytree(base / "out" / "package", out / "package")
    return prepare_job(parse_job(_table(model_dir, tmp, clients=clients, secure=secure), tmp), out)


def _runtimes(job: PreparedJob, tmp: Path, hostile: Hostile | None) -> dict[str, ClientRuntime]:
    rows = read_examples(VALIDATION, need_label=True)[:600]
    runtimes: dict[str, ClientRuntime] = {
        cid: ClientRuntime.from_package(job.package.folder, rows[i * 60: i * 60 + 40 + 5 * i], state_dir=tmp / cid)
        for i, cid in enumerate(HONEST)}
    if hostile is not None:
        runtimes["h"] = hostile
    return runtimes


def _hostile(job: PreparedJob, tmp: Path, tamper: Tamper | None = None,
             vector: Callable[[np.ndarray, float], np.ndarray] | None = None) -> Hostile:
    rows = read_examples(VALIDATION, need_label=True)[300:350]
    honest = ClientRuntime.from_package(job.package.folder, rows, state_dir=tmp / "h")
    runtime = Hostile(model=honest.model, spec=honest.spec, data=honest.data, state_dir=tmp / "h")
    runtime.tamper, runtime.vector = tamper, vector
    return runtime


def _run(base: Path, tmp: Path, model_dir: Path, *, secure: bool = False, tamper: Tamper | None = None,
         vector: Callable[[np.ndarray, float], np.ndarray] | None = None) -> tuple[dict[str, Any], State, State]:
    """(round-1 record, global state before, after) with the hostile client, or the honest four alone."""
    hostile = tamper is not None or vector is not None
    job = _prepare(base, tmp, model_dir, clients=5 if hostile else 4, secure=secure)
    before = {k: v.clone() for k, v in job.model.trainable_state().items()}
    runtimes = _runtimes(job, tmp, _hostile(job, tmp, tamper, vector) if hostile else None)
    records = job.engine.run(InProcessDriver(runtimes))
    return records[1], before, job.model.trainable_state()


@pytest.fixture(scope="module")
def honest(base: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> State:
    """The global state after round 1 with the four honest clients only: the reference every attack is held to."""
    record, _, after = _run(base, tmp_path_factory.mktemp("honest"), tiny_bert_dir)
    assert record["status"] == "ok" and record["completed_clients"] == 4
    return after


def _distance(a: State, b: State) -> float:
    return update_norm({k: a[k].double() - b[k].double() for k in a})


def _linf(a: State, b: State) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _with_config(**change: Any) -> Tamper:
    def tamper(_: Hostile, message: Message, reply: Message) -> Message:
        if reply.stage != "train":
            return reply
        return Message(reply.round, reply.stage, {**reply.config, **change}, reply.tensors)
    return tamper


def _scaled(factor: float) -> Tamper:
    def tamper(_: Hostile, message: Message, reply: Message) -> Message:
        if reply.stage != "train":
            return reply
        return Message(reply.round, reply.stage, reply.config, {k: v * factor for k, v in reply.tensors.items()})
    return tamper


@pytest.mark.parametrize(("tamper", "reason"), [
    (_with_config(num_examples="lots"), "num_examples must be a number"),
    (_with_config(num_examples=1e308), "num_examples must be an integer"),
    (_with_config(train_loss="x"), "train_loss must be a number"),
    (_with_config(seconds_train=[1]), "seconds_train must be a number"),
    (_with_config(epsilon=-1.0), "epsilon must be in"),
    (_scaled(1e30), "update norm"),
    (_with_config(num_examples=None), "num_examples is missing"),
], ids=["lots", "1e308", "loss", "seconds", "epsilon", "x1e30", "no-examples"])
def test_plain_refusals_leave_exactly_the_honest_aggregate(base: Path, tmp_path: Path, tiny_bert_dir: Path,
                                                           honest: State, tamper: Tamper, reason: str) -> None:
    record, _, after = _run(base, tmp_path, tiny_bert_dir, tamper=tamper)
    assert record["status"] == "ok" and record["completed_clients"] == 4
    assert record["rejected_clients"] == 1 and reason in record["reject_reasons"]["h"]
    assert record["drop_reasons"]["h"].startswith("rejected: ")
    assert _distance(after, honest) == 0.0  # the same four updates, summed in the same order


def test_a_plain_update_at_the_bound_with_a_huge_weight_moves_the_model_only_within_reach(
        base: Path, tmp_path: Path, tiny_bert_dir: Path, honest: State) -> None:
    """The strongest plain attack that gets in: an update just under the norm bound, claiming 10^9 examples."""
    seen: dict[str, float] = {}

    def at_the_bound(runtime: Hostile, message: Message, reply: Message) -> Message:
        bound = plain_update_bound(runtime_config, message.tensors, 5)
        direction = {k: torch.ones_like(v) for k, v in reply.tensors.items()}
        scale = 0.999 * bound / update_norm(direction)
        seen["bound"] = bound
        return Message(reply.round, reply.stage, {**reply.config, "num_examples": 10**9},
                       {k: v * scale for k, v in direction.items()})

    runtime_config = parse_job(_table(tiny_bert_dir, base, clients=5, secure=False), base)
    record, before, after = _run(base, tmp_path, tiny_bert_dir, tamper=at_the_bound)
    assert record["status"] == "ok" and record["completed_clients"] == 5 and record["examples_capped"] == ["h"]
    assert record["update_norm_bound"] == pytest.approx(seen["bound"])
    cap = runtime_config.server.examples_cap
    honest_weight = 40 + 45 + 50 + 55
    share = cap / (cap + honest_weight)
    reach = share * (seen["bound"] + _distance(honest, before))  # |mean - honest mean| <= share * |x_a - honest|
    moved = _distance(after, honest)
    assert 0.5 * reach < moved <= reach * (1 + 1e-6)
    assert all(torch.isfinite(t).all() for t in after.values())


def _declare(weight: float) -> Tamper:
    """Declare ``weight`` in the clear, whatever went into the secure sum."""
    def tamper(_: Hostile, message: Message, reply: Message) -> Message:
        if reply.config.get("secagg_weight") is None:
            return reply
        return Message(reply.round, reply.stage, {**reply.config, "secagg_weight": weight}, reply.tensors)
    return tamper


def _secure_weight(weight: float) -> Callable[[np.ndarray, float], np.ndarray]:
    """The whole vector at the clipping range, and ``weight`` x c as the weight coordinate."""
    def vector(honest: np.ndarray, c: float) -> np.ndarray:
        out = np.full_like(honest, c)
        out[-1] = weight * c
        return out
    return vector


def _wrap_weight(units_of_c: float) -> Tamper:
    """Add ``units_of_c`` x c to the weight coordinate of the masked input, past the quantizer (modulo 2^32)."""
    def tamper(_: Hostile, message: Message, reply: Message) -> Message:
        name = "secagg/" + Key.MASKED_INPUT
        if name not in reply.tensors:
            return reply
        levels = (2**32 - 1) // 5  # the grid of a 5-client round: c is levels / 2 grid steps
        masked = reply.tensors[name].numpy().copy()
        masked[-1] = (int(masked[-1]) + int(units_of_c * levels / 2)) % 2**32  # wraps as the secure sum does
        return Message(reply.round, reply.stage, reply.config, {**reply.tensors, name: torch.from_numpy(masked)})
    return tamper


@pytest.mark.parametrize(("tamper", "vector", "reasons"), [
    (_declare(1.0), _secure_weight(-0.9), ("misreported its weight",)),
    (_declare(0.0), _secure_weight(1.0), ("misreported its weight",)),
    (_wrap_weight(7.0), None, ("misreported its weight", "off the quantization grid")),
], ids=["negative-weight", "declares-less", "weight-8-past-the-quantizer"])
def test_secure_weights_that_disagree_with_the_declared_ones_refuse_the_round(
        base: Path, tmp_path: Path, tiny_bert_dir: Path, tamper: Tamper,
        vector: Callable[[np.ndarray, float], np.ndarray] | None, reasons: tuple[str, ...]) -> None:
    record, before, after = _run(base, tmp_path, tiny_bert_dir, secure=True, tamper=tamper, vector=vector)
    assert record["status"] == "failed" and any(r in record["failure"] for r in reasons), record.get("failure")
    assert _distance(after, before) == 0.0  # the model is untouched, the job goes on


def test_a_declared_weight_out_of_range_is_refused_and_the_others_are_aggregated(
        base: Path, tmp_path: Path, tiny_bert_dir: Path, honest: State) -> None:
    record, _, after = _run(base, tmp_path, tiny_bert_dir, secure=True, tamper=_declare(8.0),
                            vector=_secure_weight(8.0))
    assert record["status"] == "ok" and record["completed_clients"] == 4
    assert "secagg_weight must be in [0, 1]" in record["reject_reasons"]["h"]
    assert _linf(after, honest) <= record["secagg_error_bound"] + 1e-7


def test_values_off_the_quantization_grid_refuse_the_round(base: Path, tmp_path: Path, tiny_bert_dir: Path) -> None:
    """A client that wraps its masked input modulo 2^32 to reach past [-c, c]; one honest client dropped
    before masking, so four inputs' sums must stay within 4/5 of the ring."""
    def wrap(_: Hostile, message: Message, reply: Message) -> Message:
        name = "secagg/" + Key.MASKED_INPUT
        if name not in reply.tensors:
            return reply
        masked = reply.tensors[name].numpy().copy()
        masked += np.uint32(2**31)  # four inputs near mid-grid sum to ~2/5 of the ring: this lands at ~9/10
        return Message(reply.round, reply.stage, reply.config, {**reply.tensors, name: torch.from_numpy(masked)})

    job = _prepare(base, tmp_path, tiny_bert_dir, clients=5, secure=True)
    before = {k: v.clone() for k, v in job.model.trainable_state().items()}
    runtimes = _runtimes(job, tmp_path, _hostile(job, tmp_path, wrap))

    def drop(client_id: str, message: Message) -> bool:
        return client_id == "c0" and message.config.get("secagg_stage") == "masked_input"

    records = job.engine.run(InProcessDriver(runtimes, drop=drop))
    assert records[1]["status"] == "failed" and "off the quantization grid" in records[1]["failure"]
    assert _distance(job.model.trainable_state(), before) == 0.0


def test_the_strongest_consistent_secure_input_moves_each_coordinate_only_within_reach(
        base: Path, tmp_path: Path, tiny_bert_dir: Path, honest: State) -> None:
    """Every coordinate at +c and weight 8 (an inflated weight) through fedsite's own quantizer, which clips the
    weight coordinate to c, i.e. weight 1; declared 1: accepted, and bounded by c / W per coordinate."""
    record, before, after = _run(base, tmp_path, tiny_bert_dir, secure=True, tamper=_declare(1.0),
                                 vector=_secure_weight(8.0))
    assert record["status"] == "ok" and record["completed_clients"] == 5
    c = record["secagg_clipping_range"]
    config = parse_job(_table(tiny_bert_dir, base, clients=5, secure=True), base)
    assert c == pytest.approx(secure_clipping_range(config, before, 5))
    honest_weight = (40 + 45 + 50 + 55) / config.privacy.secure_aggregation.weight_cap
    total = honest_weight + 1.0
    # mean = (S_h + c) / (W_h + 1): per coordinate |mean - mean_h| <= (c + |mean_h|) / (W_h + 1)
    reach = (c + _linf(honest, before)) / total + record["secagg_error_bound"] * total
    moved = _linf(after, honest)
    assert 0.5 * c / total < moved <= reach
    assert math.isfinite(moved) and all(torch.isfinite(t).all() for t in after.values())
