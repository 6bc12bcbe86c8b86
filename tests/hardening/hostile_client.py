"""``python -m tests.hardening.hostile_client ATTACKS client run ...``: an attacker built on fedsite's own client.

It enrols, downloads the package and trains like any client (client.agent.Agent and client.runtime), then
rewrites what it sends: the n-th round it trains in gets the n-th attack of the comma-separated ATTACKS
("honest" sends the truth; the last attack repeats). Reply headers are written as raw JSON, so they may carry
what fedsite's own encoder refuses (NaN, Infinity).

Plain rounds: lots, inf, nan-loss, huge (hostile num_examples / train_loss values), scale (an update
x 1e30), bound (an update just under the coordinator's norm bound, claiming 10^9 examples).
Secure rounds: negative (weight -0.9 in the secure sum, 1 declared), declares-less (1 in the sum, 0 declared),
declare-8 (8 declared), max (every coordinate at the clipping range with weight 8, which fedsite's quantizer
clips to 1, and 1 declared).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.agent import Agent
from client.runtime import ClientRuntime
from localio.data import Example
from protos.codec import Message, encode_message, encode_tensors

log = logging.getLogger("fedsite.hostile")
PLAIN = ("lots", "inf", "nan-loss", "huge", "scale", "bound")
SECURE = ("negative", "declares-less", "declare-8", "max")


class HostileRuntime(ClientRuntime):
    """Trains honestly; ``attack`` says how this round's secure input and declared weight are forged."""

    schedule: tuple[str, ...] = ("honest",)
    attack: str = "honest"
    rounds: int = 0

    def train(self, message: Message) -> Message:
        self.attack = self.schedule[min(self.rounds, len(self.schedule) - 1)]
        self.rounds += 1
        log.info("round %d: attack %s", message.round, self.attack)
        return super().train(message)

    def masked_input_vector(self, trained: Message, weight: float, clipping_range: float) -> np.ndarray:
        honest = super().masked_input_vector(trained, weight, clipping_range)
        if self.attack in ("negative", "declares-less", "max"):
            forged = np.full_like(honest, clipping_range) if self.attack == "max" else honest.copy()
            forged[-1] = {"negative": -0.9, "declares-less": 1.0, "max": 8.0}[self.attack] * clipping_range
            return forged
        return honest

    def secure_step(self, message: Message) -> Message:
        reply = super().secure_step(message)
        if "secagg_weight" not in reply.config:
            return reply
        declared = {"negative": 1.0, "declares-less": 0.0, "declare-8": 8.0, "max": 1.0}.get(self.attack)
        if declared is None:
            return reply
        return Message(reply.round, reply.stage, {**reply.config, "secagg_weight": declared}, reply.tensors)


def _norm_bound(message_config: dict[str, Any], state: dict[str, torch.Tensor], sampled: int) -> float:
    """The bound the coordinator applies, computed from what the train message says: an attacker knows it too."""
    from coordinator.bounds import plain_update_bound
    from coordinator.config import parse_job

    keys = ("local_steps", "batch_size", "lr", "weight_decay", "head_lr")
    config = parse_job({"train": {k: message_config[k] for k in keys if k in message_config}}, Path("."))
    return plain_update_bound(config, state, sampled)


class HostileAgent(Agent):
    def __init__(self, options: Any, schedule: list[str]) -> None:
        super().__init__(options)
        self.schedule = schedule
        self.runtime: HostileRuntime | None = None
        self.last_train: Message | None = None

    def make_runtime(self, folder: Path, examples: list[Example]) -> ClientRuntime:
        honest = super().make_runtime(folder, examples)
        runtime = HostileRuntime(model=honest.model, spec=honest.spec, data=honest.data, state_dir=honest.state_dir)
        runtime.schedule = tuple(self.schedule)
        original = runtime.handle

        def handle(message: Message) -> Message:
            if message.stage == "train":
                self.last_train = message
            return original(message)

        runtime.handle = handle  # type: ignore[method-assign]
        self.runtime = runtime
        return runtime

    def encode_reply(self, reply: Message) -> bytes:
        attack = self.runtime.attack if self.runtime is not None else "honest"
        if reply.stage != "train" or attack not in PLAIN:
            return encode_message(reply)
        config, tensors = dict(reply.config), dict(reply.tensors)
        if attack == "lots":
            config["num_examples"] = "lots"
        elif attack == "inf":
            config["num_examples"] = math.inf
        elif attack == "nan-loss":
            config["train_loss"] = math.nan
        elif attack == "huge":
            config["num_examples"] = 1e308
        elif attack == "scale":
            tensors = {k: v * 1e30 for k, v in tensors.items()}
        elif attack == "bound":
            assert self.last_train is not None
            state = self.last_train.tensors
            bound = _norm_bound(self.last_train.config, state, 1)
            ones = {k: torch.ones_like(v) for k, v in tensors.items()}
            scale = 0.99 * bound / math.sqrt(sum(t.numel() for t in ones.values()))
            tensors = {k: v * scale for k, v in ones.items()}
            config["num_examples"] = 10**9
        head = json.dumps({"round": reply.round, "stage": reply.stage, "config": config})  # NaN/Infinity allowed
        return encode_tensors(tensors, metadata={"fedsite.message": head})


def main(argv: list[str]) -> int:
    attacks, program, *rest = argv
    schedule = attacks.split(",")
    unknown = sorted(set(schedule) - set(PLAIN) - set(SECURE) - {"honest"})
    if unknown or program != "client":
        raise SystemExit(f"hostile_client: unknown attack(s) {unknown} or program {program!r}")
    import client.agent
    from client import cli

    class Scheduled(HostileAgent):
        def __init__(self, options: Any) -> None:
            super().__init__(options, schedule)

    client.agent.Agent = Scheduled  # type: ignore[misc]  # what client.cli starts
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
