"""A coordinator and edge clients as real processes on this machine, over loopback.

What a user does with three terminals, done by one program: used by the
end-to-end tests and the round benchmark, so both exercise exactly the
commands the README gives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def process_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_coordinator(job: Path, output_dir: Path, *extra: str, log_path: Path | None = None,
                      threads: int = 1, address: str = "127.0.0.1:0",
                      start_timeout_s: float = 300.0,
                      program: tuple[str, ...] = ("-m", "coordinator"),
                      env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m coordinator serve`` (on a free loopback port by default); return (process, HOST:PORT).

    ``program`` replaces ``-m coordinator`` (the fault tests run the same CLI through a wrapper module);
    ``env``, when given, is the whole environment (instead of ``process_env(threads)``).

    Returns once the coordinator listens (before its job package is built: clients started then wait).
    """
    log_path = log_path or output_dir.parent / f"{output_dir.name}.coordinator.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child process writes to it
    proc = subprocess.Popen(
        [sys.executable, *program, "serve", "--config", str(job), "--address", address,
         "--output-dir", str(output_dir), "--linger-s", "10", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env if env is not None else process_env(threads), cwd=str(REPO),
    )
    address_file = output_dir / "address"
    address_file.unlink(missing_ok=True)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if address_file.exists() and address_file.read_text().strip():
            return proc, address_file.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited early:\n{tail(log_path)}")
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("coordinator did not start listening")


def start_client(address: str, data: Path, token: str, state_dir: Path, *extra: str,
                 log_path: Path | None = None, threads: int = 1,
                 program: tuple[str, ...] = ("-m", "client"), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m client run`` against ``address``.

    ``program`` replaces ``-m client`` (the fault tests run the same CLI through a wrapper module);
    ``env``, when given, is the whole environment (instead of ``process_env(threads)``).
    """
    log = open(log_path or state_dir.parent / f"{state_dir.name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *program, "run", "--coordinator", address, "--data", str(data), "--token", token,
         "--state-dir", str(state_dir), "--give-up-after-s", "60", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env if env is not None else process_env(threads), cwd=str(REPO),
    )


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes in order; a process still running at the deadline is killed and reports -9."""
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
