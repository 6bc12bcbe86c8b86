"""Real processes over loopback: a coordinator and fedsite-client processes, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from client.data import Example, read_examples, write_jsonl

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "coordinator" / "examples" / "data"
TRAIN = DATA / "wordnet_supersense.train.jsonl.gz"
VALIDATION = DATA / "wordnet_supersense.validation.jsonl.gz"
TOKENS = ["tok-alpha", "tok-bravo", "tok-charlie", "tok-delta", "tok-echo"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return e


def write_job(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    path = folder / "job.toml"
    path.write_text(body.replace("@VALIDATION@", str(VALIDATION)))
    return path


def disjoint_shards(folder: Path, clients: int, per_client: int, seed: int = 0) -> list[Path]:
    """Disjoint slices of the training file, one per client."""
    import random

    examples: list[Example] = read_examples(TRAIN, need_label=True)
    random.Random(seed).shuffle(examples)
    paths = []
    for i in range(clients):
        path = folder / f"shard-{i}.jsonl"
        write_jsonl(path, examples[i * per_client : (i + 1) * per_client])
        paths.append(path)
    return paths


def start_coordinator(job: Path, output_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    log = open(output_dir.parent / f"{output_dir.name}.coordinator.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--config", str(job), "--address", "127.0.0.1:0",
         "--output-dir", str(output_dir), "--linger-s", "3", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=str(REPO),
    )
    address_file = output_dir / "address"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if address_file.exists() and address_file.read_text().strip():
            return proc, address_file.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited early: {tail(log.name)}")
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("coordinator did not start listening")


def start_client(address: str, data: Path, token: str, state_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(state_dir.parent / f"{state_dir.name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "client", "run", "--coordinator", address, "--data", str(data), "--token", token,
         "--state-dir", str(state_dir), "--give-up-after-s", "60", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=str(REPO),
    )


def tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
    return codes


def wait_for_text(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False
