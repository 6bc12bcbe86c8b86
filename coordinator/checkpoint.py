"""Checkpoints of the global state, written atomically after every round.

One safetensors file per checkpoint holds the global trainable tensors and the
server optimizer's state; its metadata holds the round and the job's
fingerprint. A crash leaves either the previous or the new checkpoint, never
a torn one, and ``--resume`` continues after the newest valid one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from localio.atomic import atomic_write_bytes
from localio.errors import user_error
from protos.codec import encode_tensors

_NAME = re.compile(r"round-(\d{5})\.safetensors$")


@user_error
class CheckpointError(RuntimeError):
    """No checkpoint could be read or written."""


@dataclass
class Checkpoint:
    """One round's resumable state: the global trainable tensors, the server optimizer's, and ``info`` (the round's
    status and metrics record, so a resumed job can write a record it lost)."""
    round: int
    global_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    info: dict


class Checkpointer:
    """Writes and finds checkpoints in one folder, keeping the newest ``keep``.

    Two by default: if the newest cannot be read back (a damaged disk), :meth:`latest` falls back
    to the one before.
    """
    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = folder
        self.keep = keep

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` atomically, then drop all but the newest ``keep``; CheckpointError on a full disk."""
        tensors = {f"global/{k}": v for k, v in checkpoint.global_state.items()}
        tensors.update({f"optimizer/{k}": v for k, v in checkpoint.optimizer_state.items()})
        meta = {"round": str(checkpoint.round), "info": json.dumps(checkpoint.info, sort_keys=True)}
        path = self.folder / f"round-{checkpoint.round:05d}.safetensors"
        try:
            atomic_write_bytes(path, encode_tensors(tensors, metadata=meta))
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc
        for old in self._paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def _paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.search(p.name))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that reads back whole (older ones if the newest is damaged)."""
        for path in reversed(self._paths()):
            try:
                with safe_open(str(path), framework="pt") as handle:  # one read: tensors and metadata
                    meta = handle.metadata() or {}
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
                round_id = int(meta["round"])
                info = json.loads(meta.get("info", "{}"))
            except (SafetensorError, OSError, KeyError, ValueError):
                continue
            return Checkpoint(
                round=round_id,
                global_state={k[7:]: v for k, v in tensors.items() if k.startswith("global/")},
                optimizer_state={k[10:]: v for k, v in tensors.items() if k.startswith("optimizer/")},
                info=info,
            )
        return None
