"""In-process driver for the SecAgg+ tests (no tests here): delivers messages, simulates dropouts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from privacy.secagg import Payload, SecAggConfig, SecAggPlusClient, SecAggPlusServer, Stage


@dataclass
class Transcript:
    """Every message of a round, per stage: what the server sent and what came back."""

    sent: dict[str, dict[int, Payload]] = field(default_factory=dict)
    replies: dict[str, dict[int, Payload]] = field(default_factory=dict)


def make_inputs(n: int, size: int, clip: float, seed: int = 0) -> dict[int, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-clip, clip, size).astype(np.float32) for i in range(n)}


def run_round(
    server: SecAggPlusServer,
    clients: dict[int, SecAggPlusClient],
    inputs: dict[int, npt.NDArray[np.float32]],
    drop_at: dict[str, set[int]] | None = None,
    transcript: Transcript | None = None,
    prekeys: dict[int, tuple[bytes, bytes]] | None = None,
) -> SecAggPlusServer:
    """Drive one round; a client in drop_at[stage] stops replying from that stage on. ``prekeys``: the keys
    clients made ahead (their setup then rides on share_keys)."""
    drop_at = drop_at or {}
    gone: set[int] = set()
    outgoing = server.start(prekeys)
    while not server.done:
        stage = str(server.stage)
        gone |= drop_at.get(stage, set())
        replies = {
            cid: clients[cid].handle(msg, inputs[cid] if stage == Stage.MASKED_INPUT else None)
            for cid, msg in outgoing.items()
            if cid not in gone
        }
        if transcript is not None:
            transcript.sent[stage] = outgoing
            transcript.replies[stage] = replies
        outgoing = server.step(replies)
    return server


def new_round(
    n: int, size: int = 64, clip: float = 1.0, round_id: int = 1, **config: object
) -> tuple[SecAggPlusServer, dict[int, SecAggPlusClient]]:
    cfg = SecAggConfig(clipping_range=clip, **config)  # type: ignore[arg-type]
    server = SecAggPlusServer(cfg, round_id, list(range(n)), size, seed=round_id)
    clients = {i: SecAggPlusClient(i, seed=1000 + i) for i in range(n)}
    return server, clients
