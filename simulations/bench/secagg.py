"""Benchmark: CPU of the SecAgg+ protocol code alone, against a plain upload's serialise-and-sum.

What it measures, in one process, on the same inputs: the aggregation protocol's CPU
and bytes, nothing else. A plain "round" here is each client serialising its float32
vector (safetensors) and the server deserialising and summing them; a secure one is
privacy.secagg's four stages (every message serialised with safetensors both ways, as
the gRPC driver does). There is no model download, no training, no transport and no
round engine or Flower driver in these figures: they are not round wall times. It
reports per-client protocol CPU, server protocol CPU (by stage) and bytes on the wire,
with the secure/plain ratios.

`--dropout F` makes a fraction F of the clients drop after key sharing (never more than
a neighbourhood tolerates), so the server also rebuilds their mask keys.
`--compare-scalar-unmask` times the server's unmask stage twice on the same round (a
copy of the server just before it): with the batched Shamir reconstruction
(crypto.combine_secrets, the default) and with the earlier scalar path (one
pycryptodome Shamir.combine per secret), and projects both to `--project` clients by
a power law through the two largest measured n below it. `--prg` compares the candidate mask
generators; `--flower` also runs Flower's own SecAgg+ (SecAggPlusWorkflow +
secaggplus_mod, in-process) with the same n, vector size and threshold;
`--flower-ray N` times a warm round of Flower's Ray simulation (that one is wall time).

Measured on 2 shared cores (others' jobs running; `nice -n 10`), 1,000 floats, 5 %
dropouts after key sharing; `experiments/privacy/bench_secagg.json` (medians of 3) and
`experiments/privacy/bench_secagg_10000.json` (one round):

    python -m simulations.bench.secagg --clients 100 1000 --size 1000 --dropout 0.05 \
        --repeats 3 --compare-scalar-unmask --json experiments/privacy/bench_secagg.json
    python -m simulations.bench.secagg --clients 10000 --size 1000 --dropout 0.05 \
        --repeats 1 --compare-scalar-unmask --json experiments/privacy/bench_secagg_10000.json

    server CPU, batched / scalar Shamir     n = 100         n = 1,000       n = 10,000
    unmask stage                            0.034           0.026           0.020 projected
                                            (0.011/0.34 s)  (0.16/5.99 s)   (2.1/107 s)
                                                                            0.020 measured
                                                                            (2.1/109 s)
    all server stages of the protocol       0.091           0.065           0.046 projected
                                            (0.033/0.36 s)  (0.40/6.23 s)   (5.0/109 s)
                                                                            0.046 measured
                                                                            (5.2/112 s)

The projection is a power law through n = 100 and 1,000, per figure; the one measured
round at 10,000 agrees with it. Of the batched unmask stage at n = 1,000, about a third
is still Shamir (cProfile; with dropouts the secrets fall into ~80 index sets, most too
small for the tables); the rest is parsing and checking the replies, the dropped
clients' pairwise key agreements and the self-mask PRG.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from privacy.secagg import SecAggConfig, SecAggPlusClient, SecAggPlusServer, Stage, crypto
from privacy.secagg.messages import Payload

MEASURES = (
    "CPU of the aggregation protocol code only (serialise, mask, sum, unmask, in one process); "
    "no model download, training, transport, round engine or Flower driver: not a round's wall time"
)


@dataclass
class Figures:
    """One measured configuration: protocol CPU (s) and bytes, plain vs secure."""

    clients: int
    size: int
    dropped: int
    plain_client_protocol_cpu_s: float
    plain_server_protocol_cpu_s: float
    plain_bytes: int
    secure_client_protocol_cpu_s: float
    secure_server_protocol_cpu_s: float
    secure_bytes: int
    secure_server_stage_protocol_cpu_s: dict[str, float]
    secure_client_stage_protocol_cpu_s: dict[str, float]
    max_abs_error: float
    error_bound: float
    #: the unmask stage on a copy of the same server with the scalar path (--compare-scalar-unmask)
    scalar_unmask_cpu_s: float | None = None

    def ratios(self) -> dict[str, float]:
        return {
            "client_protocol_cpu": self.secure_client_protocol_cpu_s / self.plain_client_protocol_cpu_s,
            "server_protocol_cpu": self.secure_server_protocol_cpu_s / self.plain_server_protocol_cpu_s,
            "bytes": self.secure_bytes / self.plain_bytes,
        }

    def unmask(self) -> dict[str, float] | None:
        """Batched vs scalar reconstruction: the unmask stage and the server's whole protocol CPU."""
        if self.scalar_unmask_cpu_s is None:
            return None
        batched = self.secure_server_stage_protocol_cpu_s["unmask"]
        scalar = self.scalar_unmask_cpu_s
        other = self.secure_server_protocol_cpu_s - batched
        return {
            "unmask_batched_cpu_s": batched,
            "unmask_scalar_cpu_s": scalar,
            "unmask_batched_over_scalar": batched / scalar,
            "server_batched_cpu_s": other + batched,
            "server_scalar_cpu_s": other + scalar,
            "server_batched_over_scalar": (other + batched) / (other + scalar),
        }


@dataclass
class SecureRun:
    """What one secure round cost (CPU seconds, bytes) and the server that ran it."""

    client_cpu_s: float
    server_cpu_s: float
    bytes: int
    server_stage_cpu_s: dict[str, float]
    client_stage_cpu_s: dict[str, float]
    server: SecAggPlusServer
    dropped: set[int] = field(default_factory=set)
    scalar_unmask_cpu_s: float | None = None


def _wire(payload: Payload) -> bytes:
    return st_save(payload)


def _cpu(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _client_turn(client: SecAggPlusClient, blob: bytes, vec: npt.NDArray | None) -> bytes:
    return _wire(client.handle(st_load(blob), vec))


def _server_turn(server: SecAggPlusServer, replies: dict[int, bytes]) -> dict[int, Payload]:
    return server.step({cid: st_load(blob) for cid, blob in replies.items()})


def plain_round(inputs: dict[int, npt.NDArray[np.float32]]) -> tuple[float, float, int]:
    """Mean client CPU, server CPU and bytes of a plain (unmasked) float32 upload: serialise, sum."""
    client_cpu, uploads = 0.0, {}
    for cid, vec in inputs.items():
        uploads[cid], t = _cpu(partial(_wire, {"update": vec}))
        client_cpu += t

    def server() -> npt.NDArray[np.float64]:
        total = np.zeros(next(iter(inputs.values())).shape[0], dtype=np.float64)
        for blob in uploads.values():
            total += st_load(blob)["update"]
        return total

    _, server_cpu = _cpu(server)
    return client_cpu / len(inputs), server_cpu, sum(len(b) for b in uploads.values())


def pick_dropouts(server: SecAggPlusServer, fraction: float, seed: int) -> set[int]:
    """About `fraction` of the clients, at random, without any neighbourhood losing more than it tolerates."""
    want = round(fraction * len(server.client_ids))
    tolerated = server.neighbourhood_size - server.threshold
    lost = dict.fromkeys(server.client_ids, 0)  # owner -> dropped members of its neighbourhood
    order = list(server.client_ids)
    random.Random(f"dropouts {seed}").shuffle(order)  # not Random(seed): that built the graph's ring
    dropped: set[int] = set()
    for cid in order:
        if len(dropped) >= want:
            break
        hood = [cid, *server.neighbours[cid]]  # the graph is symmetric: cid is in these owners' neighbourhoods
        if all(lost[o] < tolerated for o in hood):
            dropped.add(cid)
            for o in hood:
                lost[o] += 1
    return dropped


def secure_round(
    inputs: dict[int, npt.NDArray[np.float32]],
    config: SecAggConfig,
    seed: int = 0,
    dropout: float = 0.0,
    compare_scalar: bool = False,
) -> SecureRun:
    """Same for a SecAgg+ round; every message goes through safetensors bytes.

    Clients in the dropout set send no masked input (nor anything after). With
    `compare_scalar`, the unmask stage also runs on a deep copy of the server
    with `batch_reconstruction = False`; the two results must be identical.
    """
    ids = sorted(inputs)
    size = inputs[ids[0]].shape[0]
    clients = {cid: SecAggPlusClient(cid) for cid in ids}
    server_cpu: dict[str, float] = {}
    client_cpu = 0.0
    client_stage: dict[str, float] = {}
    nbytes = 0
    server = SecAggPlusServer(config, 1, ids, size, seed=seed)
    dropped = pick_dropouts(server, dropout, seed) if dropout > 0 else set()
    scalar_cpu: float | None = None

    def server_call(stage: str, fn: Callable[[], dict[int, Payload]]) -> dict[int, bytes]:
        def run() -> dict[int, bytes]:
            return {cid: _wire(msg) for cid, msg in fn().items()}

        out, t = _cpu(run)
        server_cpu[stage] = server_cpu.get(stage, 0.0) + t
        return out

    outgoing = server_call("start", server.start)
    twin: SecAggPlusServer | None = None
    while not server.done:
        stage = str(server.stage)
        replies: dict[int, bytes] = {}
        for cid, blob in outgoing.items():
            nbytes += len(blob)
            if stage == Stage.MASKED_INPUT and cid in dropped:
                continue
            vec = inputs[cid] if stage == Stage.MASKED_INPUT else None
            replies[cid], t = _cpu(partial(_client_turn, clients[cid], blob, vec))
            client_cpu += t
            client_stage[stage] = client_stage.get(stage, 0.0) + t / len(ids)
            nbytes += len(replies[cid])
        if stage == Stage.UNMASK and compare_scalar:
            twin = copy.deepcopy(server)
            twin.batch_reconstruction = False
            # alternate which path runs first, so neither always inherits a warm or cold cache
            if seed % 2 == 0:
                _, scalar_cpu = _cpu(partial(_server_turn, twin, replies))
        outgoing = server_call(stage, partial(_server_turn, server, replies))
        if twin is not None and scalar_cpu is None:
            _, scalar_cpu = _cpu(partial(_server_turn, twin, replies))
    if twin is not None and not np.array_equal(twin.result(), server.result()):
        raise AssertionError("the scalar and batched unmask paths disagree")
    return SecureRun(
        client_cpu / len(ids),
        sum(server_cpu.values()),
        nbytes,
        server_cpu,
        client_stage,
        server,
        dropped,
        scalar_cpu,
    )


def measure(
    n: int,
    size: int,
    config: SecAggConfig,
    repeats: int = 1,
    seed: int = 0,
    dropout: float = 0.0,
    compare_scalar: bool = False,
) -> Figures:
    """Plain and secure rounds on the same inputs; CPU figures are medians over `repeats`."""
    rng = np.random.default_rng(seed)
    c = config.clipping_range
    inputs = {i: rng.uniform(-c, c, size).astype(np.float32) for i in range(n)}
    plains = [plain_round(inputs) for _ in range(repeats)]
    secures = [secure_round(inputs, config, seed + r, dropout, compare_scalar) for r in range(repeats)]
    server = secures[-1].server
    exact = np.sum([inputs[i].astype(np.float64) for i in server.included_clients], axis=0)
    err = float(np.abs(server.result() - exact).max())
    med = lambda xs: float(np.median(xs))  # noqa: E731
    scalar = [s.scalar_unmask_cpu_s for s in secures if s.scalar_unmask_cpu_s is not None]
    return Figures(
        n,
        size,
        len(secures[-1].dropped),
        med([p[0] for p in plains]),
        med([p[1] for p in plains]),
        plains[0][2],
        med([s.client_cpu_s for s in secures]),
        med([s.server_cpu_s for s in secures]),
        secures[0].bytes,
        {k: med([s.server_stage_cpu_s[k] for s in secures]) for k in secures[0].server_stage_cpu_s},
        {k: med([s.client_stage_cpu_s[k] for s in secures]) for k in secures[0].client_stage_cpu_s},
        err,
        server.error_bound,
        med(scalar) if scalar else None,
    )


def project(points: list[tuple[int, float]], target: int) -> float:
    """Power law through the two largest (n, seconds) points, evaluated at `target`."""
    (n1, t1), (n2, t2) = sorted(points)[-2:]
    exponent = math.log(t2 / t1) / math.log(n2 / n1)
    return t2 * (target / n2) ** exponent


# ---------------------------------------------------------------------- Flower's SecAgg+


def _flower_apps(
    n: int, size: int, inputs: dict[int, npt.NDArray[np.float32]], secure: bool, clip: float
) -> tuple[Any, Any, Any]:
    """Flower ClientApp, LegacyContext factory and fit workflow for one FedAvg round."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow

    from privacy.secagg.graph import effective_neighbourhood_size, threshold_count

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: Any, config: Any) -> Any:
            return [inputs[self.cid]], 1, {}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])

    def legacy(context: Context, rounds: int) -> Any:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(size, dtype=np.float32)]),
        )
        return LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)

    workflow = None
    if secure:  # the same neighbourhood size and threshold count as ours
        shares = effective_neighbourhood_size(n, None)
        workflow = SecAggPlusWorkflow(
            num_shares=shares if shares < n else 1.0,
            reconstruction_threshold=threshold_count(0.66, shares),
            clipping_range=clip,
            max_weight=1.0,  # every client has weight 1: the finest grid Flower offers
        )
    return app, legacy, workflow


def flower_inprocess(n: int, size: int, clip: float, secure: bool, seed: int = 0) -> dict[str, Any]:
    """Flower's SecAgg+ (or plain FedAvg) round driven in-process, messages through protobuf.

    A minimal Grid hands every Message, serialized and parsed back exactly as
    the SuperLink would, to the ClientApp in this process, so client CPU (per
    stage), server CPU and bytes are measured like ours, without Ray.
    """
    from flwr.common import Context, RecordDict, parameters_to_ndarrays
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    rng = np.random.default_rng(seed)
    inputs = {i: rng.uniform(-clip, clip, size).astype(np.float32) for i in range(n)}
    app, legacy, workflow = _flower_apps(n, size, inputs, secure, clip)
    client_stage: dict[str, float] = {}
    counters = {"bytes": 0}

    class InProcessGrid(Grid):
        def __init__(self) -> None:
            self.contexts = {
                100 + i: Context(1, 100 + i, {"partition-id": i, "num-partitions": n}, RecordDict(), {})
                for i in range(n)
            }
            self._run = Run.create_empty(1)

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def get_node_ids(self) -> list[int]:
            return list(self.contexts)

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError

        def pull_messages(self, message_ids: Any) -> Any:
            raise NotImplementedError

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
            replies = []
            for msg in messages:
                wire = message_to_proto(msg).SerializeToString()
                start = time.process_time()
                incoming = message_from_proto(ProtoMessage.FromString(wire))
                cfg = incoming.content.config_records.get("secaggplus_configs")
                stage = str(cfg["stage"]) if cfg is not None else "train"
                reply = app(incoming, self.contexts[incoming.metadata.dst_node_id])
                back = message_to_proto(reply).SerializeToString()
                client_stage[stage] = client_stage.get(stage, 0.0) + (time.process_time() - start) / n
                counters["bytes"] += len(wire) + len(back)
                replies.append(message_from_proto(ProtoMessage.FromString(back)))
            return replies

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    ctx = legacy(Context(1, 0, {}, RecordDict(), {}), 1)
    grid = InProcessGrid()
    start = time.process_time()
    DefaultWorkflow(fit_workflow=workflow)(grid, ctx)
    total_cpu = time.process_time() - start
    params = compat.arrayrecord_to_parameters(ctx.state.array_records["parameters"], keep_input=True)
    mean = parameters_to_ndarrays(params)[0].astype(np.float64)
    exact = np.mean([inputs[i].astype(np.float64) for i in range(n)], axis=0)
    client_cpu = sum(client_stage.values())
    return {
        "client_cpu_s": client_cpu,
        "server_cpu_s": total_cpu - client_cpu * n,
        "bytes": counters["bytes"],
        "client_stage_cpu_s": client_stage,
        "max_abs_error_of_sum": float(np.abs(mean - exact).max()) * n,
    }


def flower_ray_round_seconds(n: int, size: int, clip: float, secure: bool) -> float:
    """Wall seconds of a warm round (the second of two) in Flower's Ray simulation."""
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    rng = np.random.default_rng(0)
    inputs = {i: rng.uniform(-clip, clip, size).astype(np.float32) for i in range(n)}
    app, legacy, workflow = _flower_apps(n, size, inputs, secure, clip)
    rounds: list[float] = []

    def timed(grid: Any, context: Any) -> None:
        from flwr.server.workflow.default_workflows import default_fit_workflow

        start = time.perf_counter()
        (workflow or default_fit_workflow)(grid, context)
        rounds.append(time.perf_counter() - start)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        DefaultWorkflow(fit_workflow=timed)(grid, legacy(context, 2))

    run_simulation(
        server_app=server_app,
        client_app=app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return rounds[-1]


# ---------------------------------------------------------------------- PRG choice


def bench_prg(size: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per `size` uint32 mask words for each candidate generator."""
    seed = os.urandom(32)

    def pcg64_raw() -> object:
        bits = np.random.PCG64(np.frombuffer(seed, dtype=np.uint32).tolist())
        return bits.random_raw((size + 1) // 2).view(np.uint32)[:size]

    def pcg64_integers() -> object:
        gen = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
        return gen.integers(0, 2**32, size, dtype=np.uint32)

    def aes_ctr() -> object:
        return crypto.prg_uint32(seed, size)

    def flower_randomstate() -> object:  # what Flower's pseudo_rand_gen does
        return np.random.RandomState(int.from_bytes(seed[:4], "little")).randint(0, 2**32 - 1, size, dtype=np.int64)

    out = {}
    for name, fn in [
        ("aes_ctr (chosen)", aes_ctr),
        ("numpy_pcg64_random_raw", pcg64_raw),
        ("numpy_pcg64_integers", pcg64_integers),
        ("flower_randomstate_int64", flower_randomstate),
    ]:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def _print_flower(n: int, size: int, clip: float, ours: Figures | None) -> dict[str, Any]:
    plain = flower_inprocess(n, size, clip, secure=False)
    secure = flower_inprocess(n, size, clip, secure=True)
    row: dict[str, Any] = {"clients": n, "plain": plain, "secure": secure}
    print(
        f"{n:>4} Flower secure/plain: client CPU {secure['client_cpu_s']:.3f}/"
        f"{plain['client_cpu_s']:.3f} s, server CPU {secure['server_cpu_s']:.2f}/"
        f"{plain['server_cpu_s']:.2f} s, {secure['bytes'] / 1e6:.1f}/{plain['bytes'] / 1e6:.1f} MB,"
        f" max error of the sum {secure['max_abs_error_of_sum']:.1e}"
    )
    stages = ", ".join(f"{k} {v:.4f}" for k, v in secure["client_stage_cpu_s"].items())
    print(f"      Flower client CPU by stage (s): {stages}")
    if ours is not None:
        # Flower's rounds also carry the model download and fit(); ours carry only the
        # aggregation. Compare what secure aggregation adds: secure minus plain.
        extra = {
            "client_cpu": (
                secure["client_cpu_s"] - plain["client_cpu_s"],
                ours.secure_client_protocol_cpu_s - ours.plain_client_protocol_cpu_s,
            ),
            "server_cpu": (
                secure["server_cpu_s"] - plain["server_cpu_s"],
                ours.secure_server_protocol_cpu_s - ours.plain_server_protocol_cpu_s,
            ),
            "bytes": (secure["bytes"] - plain["bytes"], ours.secure_bytes - ours.plain_bytes),
        }
        row["added_by_secagg_flower_vs_ours"] = extra
        print(
            "      added by SecAgg+, Flower vs ours: "
            f"client CPU {extra['client_cpu'][0]:.4f} vs {extra['client_cpu'][1]:.4f} s "
            f"(x{extra['client_cpu'][0] / extra['client_cpu'][1]:.1f}), "
            f"server CPU {extra['server_cpu'][0]:.3f} vs {extra['server_cpu'][1]:.3f} s "
            f"(x{extra['server_cpu'][0] / extra['server_cpu'][1]:.1f}), "
            f"bytes {extra['bytes'][0] / 1e6:.2f} vs {extra['bytes'][1] / 1e6:.2f} MB; "
            f"max error of the sum {secure['max_abs_error_of_sum']:.1e} vs {ours.max_abs_error:.1e}"
        )
    sys.stdout.flush()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.secagg",
        description="CPU of the SecAgg+ protocol code alone vs a plain upload's serialise-and-sum "
        "(client CPU, server CPU by stage, bytes; ratios). Not round wall time.",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--size", type=int, default=1_000_000, help="floats per vector")
    parser.add_argument("--threshold", type=float, default=0.66)
    parser.add_argument("--clip", type=float, default=1.0, help="clipping range c")
    parser.add_argument("--repeats", type=int, default=3, help="report medians over this many")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction of clients that drop after key sharing")
    parser.add_argument(
        "--compare-scalar-unmask",
        action="store_true",
        help="also time the unmask stage with the earlier scalar Shamir path, on a copy of the same server",
    )
    parser.add_argument(
        "--project", type=int, default=10_000, help="project the unmask comparison to this many clients"
    )
    parser.add_argument("--prg", action="store_true", help="also compare mask generators")
    parser.add_argument(
        "--flower",
        action="store_true",
        help="also run Flower's SecAgg+ in-process (protobuf messages, no Ray) per --clients",
    )
    parser.add_argument(
        "--flower-ray",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="also time a warm round of Flower's Ray simulation, secure vs plain, for these n",
    )
    parser.add_argument("--json", default="", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    config = SecAggConfig(clipping_range=args.clip, threshold=args.threshold)
    report: dict[str, Any] = {
        "measures": MEASURES,
        "size": args.size,
        "threshold": args.threshold,
        "dropout": args.dropout,
        "repeats": args.repeats,
        "rounds": [],
    }

    if args.prg:
        prg = bench_prg(args.size)
        report["prg_ms"] = prg
        print(f"PRG, ms per {args.size} uint32 words:")
        for name, ms in prg.items():
            print(f"  {name:28s} {ms:8.2f}")

    print(f"SecAgg+ vs plain upload, {MEASURES}; {args.size} floats, medians of {args.repeats}")
    print(
        f"{'n':>5} {'client CPU s plain/secure':>26} {'x':>6} {'server CPU s plain/secure':>26} "
        f"{'x':>6} {'MB plain/secure':>18} {'x':>5}  max err / bound"
    )
    figures: dict[int, Figures] = {}
    for n in args.clients:
        fig = figures[n] = measure(
            n, args.size, config, args.repeats, dropout=args.dropout, compare_scalar=args.compare_scalar_unmask
        )
        r = fig.ratios()
        report["rounds"].append({**asdict(fig), "ratios": r, "unmask_comparison": fig.unmask()})
        print(
            f"{n:>5} {fig.plain_client_protocol_cpu_s:12.4f}/{fig.secure_client_protocol_cpu_s:<13.4f} "
            f"{r['client_protocol_cpu']:6.1f} {fig.plain_server_protocol_cpu_s:12.3f}/"
            f"{fig.secure_server_protocol_cpu_s:<13.3f} {r['server_protocol_cpu']:6.1f} "
            f"{fig.plain_bytes / 1e6:8.1f}/{fig.secure_bytes / 1e6:<9.1f} "
            f"{r['bytes']:5.3f}  {fig.max_abs_error:.2e} / {fig.error_bound:.2e}"
        )
        for who, stages in (
            ("server", fig.secure_server_stage_protocol_cpu_s),
            ("client", fig.secure_client_stage_protocol_cpu_s),
        ):
            text = ", ".join(f"{k} {v:.4f}" for k, v in stages.items())
            print(f"      {who} CPU by stage (s): {text}")
        cmp = fig.unmask()
        if cmp is not None:
            print(
                f"      {fig.dropped} dropped; server unmask CPU batched/scalar {cmp['unmask_batched_cpu_s']:.3f}/"
                f"{cmp['unmask_scalar_cpu_s']:.3f} s (x{cmp['unmask_batched_over_scalar']:.3f}); all server "
                f"stages {cmp['server_batched_cpu_s']:.3f}/{cmp['server_scalar_cpu_s']:.3f} s "
                f"(x{cmp['server_batched_over_scalar']:.3f})"
            )
        sys.stdout.flush()

    compared = {n: f.unmask() for n, f in figures.items() if f.unmask() is not None and n < args.project}
    if len(compared) >= 2:
        projected = {
            key: project([(n, c[key]) for n, c in compared.items() if c is not None], args.project)
            for key in ("unmask_batched_cpu_s", "unmask_scalar_cpu_s", "server_batched_cpu_s", "server_scalar_cpu_s")
        }
        projected["unmask_batched_over_scalar"] = projected["unmask_batched_cpu_s"] / projected["unmask_scalar_cpu_s"]
        projected["server_batched_over_scalar"] = projected["server_batched_cpu_s"] / projected["server_scalar_cpu_s"]
        report["projection"] = {
            "clients": args.project,
            "method": "per figure, a power law t = a * n^b through the two largest measured n below it",
            **projected,
        }
        print(
            f"{args.project:>5} projected (power law through the two largest n below): server unmask CPU "
            f"batched/scalar "
            f"{projected['unmask_batched_cpu_s']:.2f}/{projected['unmask_scalar_cpu_s']:.2f} s "
            f"(x{projected['unmask_batched_over_scalar']:.3f}); all server stages "
            f"{projected['server_batched_cpu_s']:.2f}/{projected['server_scalar_cpu_s']:.2f} s "
            f"(x{projected['server_batched_over_scalar']:.3f})"
        )

    if args.flower:
        print("Flower SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), same n, size, threshold:")
        report["flower"] = [_print_flower(n, args.size, args.clip, figures.get(n)) for n in args.clients]
    if args.flower_ray:
        report["flower_ray"] = []
        for n in args.flower_ray:
            plain = flower_ray_round_seconds(n, args.size, args.clip, secure=False)
            secure = flower_ray_round_seconds(n, args.size, args.clip, secure=True)
            report["flower_ray"].append({"clients": n, "plain_s": plain, "secure_s": secure})
            print(
                f"{n:>4} Flower Ray simulation, warm round wall time: plain {plain:.2f} s, "
                f"SecAgg+ {secure:.2f} s (x{secure / plain:.1f})"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
