"""Checkpoints: atomic, newest-valid-wins, and resume truncates metrics to what was kept."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.checkpoint import Checkpoint, Checkpointer
from coordinator.metrics import MetricsLog


def _ckpt(r: int) -> Checkpoint:
    return Checkpoint(round=r, global_state={"w": torch.full((2,), float(r))}, optimizer_state={}, info={"r": r})


def test_latest_survives_a_torn_newest_file(tmp_path: Path) -> None:
    ckpts = Checkpointer(tmp_path, keep=3)
    for r in (1, 2, 3):
        ckpts.save(_ckpt(r))
    newest = tmp_path / "round-00003.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # a crash mid-write elsewhere cannot do this, a disk can
    latest = ckpts.latest()
    assert latest is not None and latest.round == 2 and torch.equal(latest.global_state["w"], torch.full((2,), 2.0))


def test_only_the_newest_are_kept_and_no_temp_files_remain(tmp_path: Path) -> None:
    ckpts = Checkpointer(tmp_path, keep=2)
    for r in range(1, 6):
        ckpts.save(_ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00004.safetensors", "round-00005.safetensors"]


def test_metrics_truncate_after_resume_point(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in range(4):
        log.append({"round": r, "val_accuracy": r / 10})
    log.truncate_after(2)
    assert [r["round"] for r in log.read()] == [0, 1, 2]
    log.append({"round": 3, "x": float("nan")})
    assert log.read()[-1] == {"round": 3, "x": None}


def test_a_failed_write_is_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A real write failure (the file-size limit makes the OS refuse the write, as a full disk would)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from coordinator.checkpoint import Checkpoint, Checkpointer, CheckpointError
        ckpts = Checkpointer(Path({str(tmp_path)!r}))
        ckpts.save(Checkpoint(1, {{"w": torch.ones(4)}}, {{}}, {{}}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        try:
            ckpts.save(Checkpoint(2, {{"w": torch.zeros(100_000)}}, {{}}, {{}}))
        except CheckpointError as exc:
            print("ERROR:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "ERROR: cannot write checkpoint" in proc.stdout, proc.stderr
    latest = Checkpointer(tmp_path).latest()
    assert latest is not None and latest.round == 1 and torch.equal(latest.global_state["w"], torch.ones(4))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
