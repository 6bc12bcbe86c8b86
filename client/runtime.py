"""What a client does with each message, whatever carried it.

The gRPC agent and the Flower ClientApp both hand messages to a
:class:`ClientRuntime`; it owns the local model (built from the job package),
the encoded local data and the client's state directory, and turns a
``train`` message into an update (delta of the trainable tensors).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.data import Example, check_labels
from client.trainer import TrainSettings, data_generator, train_steps
from coordinator.engine import DECLINED, TRAIN
from emulator.lora import load_trainable_state, trainable_state
from emulator.package import JobSpec, load_trainable_model
from emulator.tasks import EncodedExamples, encode
from protos.codec import Message

log = logging.getLogger("fedsite.client")


class ClientError(RuntimeError):
    """A message this client cannot act on."""


@dataclass
class ClientRuntime:
    model: torch.nn.Module
    spec: JobSpec
    data: EncodedExamples
    state_dir: Path | None = None

    @property
    def data_seed(self) -> int:
        """Seeds this client's batch order from its data, not from an id a driver assigns, so
        the gRPC and Flower runs of one job train on the same batches."""
        if not hasattr(self, "_data_seed"):
            digest = hashlib.sha256(repr((self.data.input_ids, self.data.labels)).encode()).digest()
            self._data_seed = int.from_bytes(digest[:4], "little")
        return self._data_seed

    @classmethod
    def from_package(cls, package_dir: Path, examples: Sequence[Example], *, state_dir: Path | None,
                     source: str = "local data") -> ClientRuntime:
        model, tokenizer, spec = load_trainable_model(package_dir)
        if spec.task == "classification":
            check_labels(examples, spec.labels, source)
        label2id = {label: i for i, label in enumerate(spec.labels)}
        data = encode(examples, tokenizer, task=spec.task, max_length=spec.max_length, label2id=label2id)
        return cls(model=model, spec=spec, data=data, state_dir=state_dir)

    def handle(self, message: Message) -> Message:
        if message.stage == TRAIN:
            return self.train(message)
        raise ClientError(f"unknown stage {message.stage!r}")

    def train(self, message: Message) -> Message:
        cfg: dict[str, Any] = message.config
        settings = TrainSettings(
            local_steps=int(cfg["local_steps"]), batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
            weight_decay=float(cfg.get("weight_decay", 0.0)), seed=int(cfg.get("seed", 0)),
        )
        global_state = message.tensors
        load_trainable_state(self.model, global_state)
        generator = data_generator(settings.seed, message.round, self.data_seed)
        result = train_steps(self.model, self.data, settings, generator=generator)
        new_state = trainable_state(self.model)
        delta = {name: new_state[name] - global_state[name].to(torch.float32) for name in new_state}
        if not all(torch.isfinite(t).all() for t in delta.values()):
            return Message(round=message.round, stage=DECLINED,
                           config={"reason": "local training diverged (non-finite update)"})
        return Message(
            round=message.round, stage=TRAIN, tensors=delta,
            config={"num_examples": len(self.data), "train_loss": result.loss, "steps": result.steps,
                    "seconds_train": result.seconds},
        )
