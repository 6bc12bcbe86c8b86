"""Load benchmark: N concurrent clients against the real coordinator, one round, on loopback.

    python -m simulations.bench.load [--clients 200] [--model DIR] [--drop-fraction 0.05]
                                     [--reject-fraction 0.05] [--json OUT]

The coordinator is built exactly as ``fedsite-coordinator serve`` builds it
(job file -> prepare_job -> registry, mailbox, servicer, start_server, engine
thread), in this process. Each client is a thread with its own channel that
does what ``client.agent.Agent`` does on the wire: enrol, download and verify
the job package, poll, fetch its task, and upload a reply, retrying
RESOURCE_EXHAUSTED/UNAVAILABLE with backoff. Training is replaced by a small
random delta of the right shapes, so the figures measure the coordinator,
not the trainer. A fraction of the clients misbehave on purpose: some vanish
after fetching their task (dropped: heartbeat timeout) and some upload a
delta of the wrong shape (rejected by the engine).

What it checks: every client is accounted for (completed, dropped or
rejected, and each in the group it was meant to be in), the round completes,
and the coordinator logs no error. What it reports: per-RPC latency p50/p99
(client side, including queueing in the server) and the round's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import (
    MAX_CHUNK_BYTES,
    BlobAssembler,
    Message,
    decode_message,
    encode_message,
    iter_chunks,
    sha256_hex,
)
from protos.wire import VERSION_KEY, WIRE_VERSION
from simulations.harness import tiny_jobs

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 64 * 1024),
                   ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 64 * 1024)]
T = TypeVar("T")

JOB = """
[job]
name = "bench-load"
rounds = 1
clients_per_round = {clients}
min_clients = {min_clients}
round_timeout_s = {round_timeout}
heartbeat_timeout_s = {heartbeat}
wait_for_clients_s = 300
sample_grace_s = 60
seed = 0
[model]
path = "{model}"
max_length = 16
[data]
validation = "{validation}"
validation_max_examples = 50
[train]
local_steps = 1
batch_size = 4
[lora]
r = 2
[enrollment]
tokens_file = "tokens.txt"
"""


def make_tiny_bert(folder: Path) -> Path:
    """A 2-block, hidden-32 BERT with MiniLM's real tokenizer (BERT's default dropout, 64 positions)."""
    return tiny_jobs.make_tiny_bert(folder, max_positions=64, dropout=0.1)


class _LogWatch(logging.Handler):
    """Every WARNING+ record the coordinator side logs, to tell expected refusals from errors."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [self.format(r) for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


@dataclass
class ClientResult:
    name: str
    role: str  # "good" | "drop" | "reject"
    client_id: str = ""
    outcome: str = "pending"  # "uploaded" | "vanished" | "refused: ..." | "error: ..."
    retries: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class LoadClient:
    """The wire protocol of client.agent.Agent, with training replaced by a random delta."""

    def __init__(self, address: str, token: str, result: ClientResult, give_up_s: float = 600.0) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.token = token
        self.result = result
        self.give_up_at = time.monotonic() + give_up_s

    def _timed(self, method: str, fn: Callable[[], T]) -> T:
        delay = 0.2
        while True:
            start = time.perf_counter()
            try:
                value = fn()
                self.result.latencies[method].append(time.perf_counter() - start)
                return value
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > self.give_up_at:
                    raise
                self.result.retries += 1
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 5.0)

    def _download(self, method: str, call: Callable[..., Iterator[pb.Chunk]], request: pb.FetchRequest) -> bytes:
        def fetch() -> bytes:
            assembler: BlobAssembler | None = None
            for chunk in call(request, timeout=300):
                assembler = assembler or BlobAssembler(chunk.total_size, chunk.sha256, max_bytes=1 << 31)
                assembler.add(chunk.offset, chunk.data)
            assert assembler is not None, f"{method}: empty stream"
            return assembler.finish()

        return self._timed(method, fetch)

    def run(self) -> None:
        r = self.result
        try:
            reply = self._timed("Enroll", lambda: self.stub.Enroll(
                pb.EnrollRequest(token=self.token, client_name=r.name), timeout=30))
            creds = reply.credentials
            r.client_id = creds.client_id
            package = self._download("FetchPackage", self.stub.FetchPackage, pb.FetchRequest(credentials=creds))
            assert sha256_hex(package) == reply.package_sha256
            while True:
                task = self._timed("PollTask", lambda: self.stub.PollTask(pb.PollRequest(credentials=creds),
                                                                          timeout=30))
                if task.kind == pb.Task.DONE:
                    r.outcome = r.outcome if r.outcome != "pending" else "done before a task"
                    return
                if task.kind == pb.Task.RUN:
                    break
                time.sleep(task.retry_after_ms / 1000 * (0.5 + random.random()))
            blob = self._download("FetchTask", self.stub.FetchTask,
                                  pb.FetchRequest(credentials=creds, task_id=task.task_id))
            message = decode_message(blob)
            if r.role == "drop":
                r.outcome = "vanished"
                return
            self._timed("Upload", lambda: self.stub.Upload(self._chunks(creds, task.task_id, self._reply(message)),
                                                           timeout=300))
            r.outcome = "uploaded"
        except grpc.RpcError as exc:
            r.outcome = f"refused: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # a bug in the benchmark or a broken reply: counted, never silent
            r.outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            self.channel.close()

    def _reply(self, task: Message) -> bytes:
        gen = torch.Generator().manual_seed(sum(self.result.name.encode()))
        # within what one honest AdamW step can move (lr 5e-4 per coordinate; coordinator/bounds.py refuses more)
        delta = {k: 1e-4 * torch.randn(v.shape, generator=gen) for k, v in task.tensors.items()}
        if self.result.role == "reject":  # wrong shapes: the engine's check_update must refuse it
            delta = {k: torch.zeros(v.numel() + 1) for k, v in task.tensors.items()}
        config = {VERSION_KEY: WIRE_VERSION, "num_examples": 8, "train_loss": 1.0, "seconds_train": 0.0}
        return encode_message(Message(task.round, "train", config, delta))

    @staticmethod
    def _chunks(creds: pb.Credentials, task_id: str, blob: bytes) -> Iterator[pb.UploadChunk]:
        for i, (offset, piece) in enumerate(iter_chunks(blob)):
            if i == 0:
                yield pb.UploadChunk(credentials=creds, task_id=task_id, total_size=len(blob),
                                     sha256=sha256_hex(blob), offset=offset, data=piece)
            else:
                yield pb.UploadChunk(offset=offset, data=piece)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LoadReport:
    clients: int
    record: dict[str, Any]
    results: list[ClientResult]
    errors: list[str]
    round_seconds: float
    wall_seconds: float

    def latency_ms(self) -> dict[str, dict[str, float]]:
        per: dict[str, list[float]] = defaultdict(list)
        for r in self.results:
            for method, values in r.latencies.items():
                per[method].extend(values)
                per["all"].extend(values)
        return {m: {"n": len(v), "p50": 1000 * _percentile(v, 0.5), "p99": 1000 * _percentile(v, 0.99)}
                for m, v in sorted(per.items())}

    def accounting(self) -> dict[str, list[str]]:
        """Each client's fate as the coordinator recorded it, by the role the benchmark gave it."""
        reasons: dict[str, str] = self.record.get("drop_reasons", {})
        fate: dict[str, list[str]] = defaultdict(list)
        for r in self.results:
            why = reasons.get(r.client_id, "")
            if r.client_id and not why and r.outcome == "uploaded":
                fate[f"{r.role}->completed"].append(r.name)
            elif "heartbeat" in why:
                fate[f"{r.role}->dropped"].append(r.name)
            elif why:
                fate[f"{r.role}->rejected"].append(r.name)
            else:
                fate[f"{r.role}->unaccounted({r.outcome})"].append(r.name)
        return dict(fate)

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients, "status": self.record.get("status"),
            "sampled": self.record.get("sampled_clients"), "completed": self.record.get("completed_clients"),
            "dropped_or_rejected": self.record.get("dropped_clients"),
            "accounting": {k: len(v) for k, v in self.accounting().items()},
            "retries": sum(r.retries for r in self.results), "coordinator_errors": len(self.errors),
            "round_seconds": round(self.round_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
            "round_phase_seconds": {k: round(float(self.record[k]), 2) for k in
                                    ("seconds_exchange", "seconds_aggregate", "seconds_eval") if k in self.record},
            "bytes_down": self.record.get("bytes_down"), "bytes_up": self.record.get("bytes_up"),
            "latency_ms": {m: {k: round(v, 2) for k, v in d.items()} for m, d in self.latency_ms().items()},
        }


def run_load(clients: int, workdir: Path, *, model: Path | None = None, drop_fraction: float = 0.05,
             reject_fraction: float = 0.05, heartbeat_timeout_s: float = 4.0, max_workers: int = 64,
             on_ready: Callable[[Any, Any], Callable[[], None]] | None = None) -> LoadReport:
    """Stand up the coordinator in-process, run one round with ``clients`` load clients, return the figures.

    ``on_ready(prepared_job, registry)`` runs once the coordinator serves, before the round; it returns a
    function called after the round (bench.dashboard starts a dashboard and its viewers this way).
    """
    from coordinator.config import load_job
    from coordinator.job import prepare_job
    from coordinator.mailbox import Mailbox
    from coordinator.registry import ClientRegistry, read_tokens
    from coordinator.server import start_server
    from coordinator.servicer import CoordinatorServicer, PackageBlob

    workdir.mkdir(parents=True, exist_ok=True)
    model = model or make_tiny_bert(workdir / "tiny-bert")
    n_drop, n_reject = round(clients * drop_fraction), round(clients * reject_fraction)
    roles = ["drop"] * n_drop + ["reject"] * n_reject + ["good"] * (clients - n_drop - n_reject)
    random.Random(0).shuffle(roles)
    tokens = [f"load-token-{i:04d}" for i in range(clients)]
    (workdir / "tokens.txt").write_text("\n".join(tokens) + "\n")
    job_path = workdir / "job.toml"
    job_path.write_text(JOB.format(clients=clients, min_clients=max(1, roles.count("good")), model=model,
                                   validation=VALIDATION, round_timeout=600, heartbeat=heartbeat_timeout_s))
    output = workdir / "run"
    config = load_job(job_path)
    output.mkdir(parents=True, exist_ok=True)
    fedsite_log = logging.getLogger("fedsite")
    fedsite_log.setLevel(logging.INFO)
    log_file = logging.FileHandler(output / "coordinator.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fedsite_log.addHandler(log_file)
    watch = _LogWatch()  # on the root logger: sees fedsite's and grpc's warnings and errors
    logging.getLogger().addHandler(watch)
    job = prepare_job(config, output)
    registry = ClientRegistry.from_tokens(read_tokens(job_path.parent / "tokens.txt"), output / "clients.json")
    mailbox = Mailbox(registry, heartbeat_timeout_s=config.job.heartbeat_timeout_s)
    servicer = CoordinatorServicer(job_name=config.job.name, registry=registry, mailbox=mailbox,
                                   package=PackageBlob(job.package.blob, job.package.sha256))
    server = start_server(servicer, "127.0.0.1:0", max_workers=max_workers)
    server.set_serving(True)
    address = f"127.0.0.1:{server.port}"
    records: list[dict[str, Any]] = []
    engine_error: list[BaseException] = []

    def engine() -> None:
        try:
            records.extend(job.engine.run(mailbox, evaluate_first=False))
        except BaseException as exc:  # reported below, not lost in a thread
            engine_error.append(exc)
        finally:
            mailbox.close("job complete")

    results = [ClientResult(name=f"load-{i:04d}", role=role) for i, role in enumerate(roles)]
    after = on_ready(job, registry) if on_ready is not None else None
    started = time.monotonic()
    engine_thread = threading.Thread(target=engine, name="engine")
    engine_thread.start()
    threads = [threading.Thread(target=LoadClient(address, tokens[i], results[i]).run, name=results[i].name)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine_thread.join()
    wall = time.monotonic() - started
    if after is not None:
        after()
    server.stop(0)
    logging.getLogger().removeHandler(watch)
    fedsite_log.removeHandler(log_file)
    log_file.close()
    if engine_error:
        raise RuntimeError(f"round engine failed: {engine_error[0]!r}") from engine_error[0]
    (record,) = [r for r in records if r["round"] == 1]
    return LoadReport(clients, record, results, watch.errors(), float(record.get("seconds", float("nan"))), wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: a tiny BERT built here)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--drop-fraction", type=float, default=0.05)
    parser.add_argument("--reject-fraction", type=float, default=0.05)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        report = run_load(args.clients, args.workdir or Path(tmp), model=args.model,
                          drop_fraction=args.drop_fraction, reject_fraction=args.reject_fraction)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    unaccounted = [k for k in summary["accounting"] if "unaccounted" in k]
    ok = summary["status"] == "ok" and not unaccounted and not report.errors
    if report.errors:
        print("coordinator errors:\n" + "\n".join(report.errors[:5]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
