"""What a client does with each message, whatever carried it.

The gRPC agent and the Flower ClientApp both hand messages to a
:class:`ClientRuntime`; it owns the local model (built from the job package),
the encoded local data and the client's state directory, and turns a
``train`` message into an update (delta of the trainable tensors) and the
``secagg`` stages into SecAgg+ replies. Every check on a single update
(finite values, the norm bound) happens here, before masking: under secure
aggregation nobody downstream can look.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.trainer import PrivatizeFn, TrainSettings, data_generator, is_head_parameter, train_steps
from emulator.lora import load_trainable_state, trainable_state
from emulator.package import JobSpec, load_trainable_model
from emulator.prefix import (
    PREFIX_FILE,
    FrozenPrefix,
    compute_prefix,
    cut_index,
    load_prefix,
    prefix_fingerprint,
    store_prefix,
)
from emulator.tasks import EncodedExamples, encode
from localio.data import Example, check_labels
from privacy.accounting import (
    PrivacyBudgetExhausted,
    PrivacyLedger,
    PrivacyPlanError,
    check_budget,
    plan_noise_multiplier,
)
from privacy.client_dp import ClientDPError, clip_update, distributed_noise_share
from privacy.local_dp import make_private, unwrap
from privacy.secagg import SecAggError, SecAggPlusClient
from privacy.secagg import Stage as SecAggStage
from privacy.secagg.messages import is_keyed_share_keys, read_header
from protos.codec import Message, flatten_state, numpy_to_tensors
from protos.wire import (
    VERSION_KEY,
    WIRE_VERSION,
    ClientReport,
    DeclineReason,
    SecAggInstruction,
    Stage,
    TrainInstruction,
    WireVersionError,
    refusal,
)

log = logging.getLogger("fedsite.client")

SECAGG_PREFIX = "secagg/"
PREFIX_CACHE_KEY = "frozen-prefix"
DATA_SEED_KEY = "data-seed"
LEDGER_FILE = "privacy-ledger.json"


class ClientError(RuntimeError):
    """A message this client cannot act on."""


@dataclass
class ClientRuntime:
    """What a client does with one message, without any transport: the gRPC agent and the Flower client
    both call :meth:`handle`, so the two drivers train the same way.
    """
    model: torch.nn.Module
    spec: JobSpec
    data: EncodedExamples | None = None  # this client's encoded examples; None: ``load_data`` gives them
    state_dir: Path | None = None
    secagg: SecAggPlusClient | None = field(default=None, repr=False)
    # where frozen-prefix states are kept, one file per fingerprint; None = this client's state folder
    # (simulations share one folder, so jobs over the same data and model reuse each other's states)
    prefix_cache_dir: Path | None = None
    # encodes the examples when first needed (see ``examples``)
    load_data: Callable[[], EncodedExamples] | None = field(default=None, repr=False)

    @property
    def examples(self) -> EncodedExamples:
        """This client's encoded examples, from ``load_data`` on first use when none were given.

        Only training reads them: a simulated client whose runtime is rebuilt for each message
        (another actor may have served it since) would otherwise encode its data again for each
        of the three SecAgg+ stages that never look at it.
        """
        if self.data is None:
            if self.load_data is None:
                raise ClientError("this client was given neither its examples nor a way to load them")
            self.data = self.load_data()
        return self.data

    @classmethod
    def from_package(cls, package_dir: Path, examples: Sequence[Example], *, state_dir: Path | None,
                     source: str = "local data") -> ClientRuntime:
        """A runtime for an unpacked job package and this client's examples (labels checked against the job's)."""
        model, tokenizer, spec = load_trainable_model(package_dir)
        if spec.task == "classification":
            check_labels(examples, spec.labels, source)
        label2id = {label: i for i, label in enumerate(spec.labels)}
        data = encode(examples, tokenizer, task=spec.task, max_length=spec.max_length, label2id=label2id)
        return cls(model=model, spec=spec, data=data, state_dir=state_dir)

    @property
    def data_seed(self) -> int:
        """Seeds this client's batch order from its data, not from an id a driver assigns, so
        the gRPC and Flower runs of one job train on the same batches."""
        cached = self.examples.cache.get(DATA_SEED_KEY)  # kept with the examples: a simulated client's runtime
        if isinstance(cached, int):  # is rebuilt for almost every message, its encoded examples are not
            return cached
        digest = hashlib.sha256(repr((self.examples.input_ids, self.examples.labels)).encode()).digest()
        seed = self.examples.cache[DATA_SEED_KEY] = int.from_bytes(digest[:4], "little")
        return seed

    def frozen_prefix(self) -> FrozenPrefix | None:
        """The frozen blocks below the first trained one, run once over this client's data and kept with it
        (``[train] cache_frozen_prefix``); None when the model cannot be cut or nothing would be saved."""
        cut = cut_index(self.model)
        if cut is None or cut == 0:
            return None
        cached = self.examples.cache.get(PREFIX_CACHE_KEY)
        if isinstance(cached, FrozenPrefix) and cached.cut == cut and cached.model_id == id(self.model):
            return cached
        start = time.monotonic()
        # kept in the state folder too: a restarted client, or a simulated one served by another actor
        # next round, reads the states instead of running the frozen blocks over its data again
        fingerprint = prefix_fingerprint(self.model, self.examples, cut)
        stored = (self.prefix_cache_dir / f"{fingerprint[:40]}.safetensors" if self.prefix_cache_dir is not None
                  else self.state_dir / PREFIX_FILE if self.state_dir is not None else None)
        prefix = load_prefix(stored, self.model, cut, fingerprint) if stored is not None else None
        if prefix is None:
            prefix = compute_prefix(self.model, self.examples, cut)
            saved = stored is not None and store_prefix(prefix, stored, fingerprint)
            log.info("ran the frozen blocks below block %d over %d examples in %.1fs%s", cut, len(self.examples),
                     time.monotonic() - start, f" (kept in {stored})" if saved else "")
        else:
            log.info("read the frozen blocks' output for %d examples from %s in %.1fs", len(self.examples), stored,
                     time.monotonic() - start)
        prefix.model_id = id(self.model)
        self.examples.cache[PREFIX_CACHE_KEY] = prefix
        return prefix

    def ledger(self, accountant: str) -> PrivacyLedger:
        """This client's privacy ledger, loaded once: ε must compose across rounds and restarts."""
        path = self.state_dir / LEDGER_FILE if self.state_dir is not None else None
        if not hasattr(self, "_ledger"):
            self._ledger = PrivacyLedger(path, accountant=accountant)
        return self._ledger

    def handle(self, message: Message) -> Message:
        """The reply to one coordinator message (train, or a SecAgg+ stage). A message from another wire
        version is answered with a refusal that says so, rather than failing on a missing key.
        """
        try:
            if message.stage == Stage.TRAIN:
                return self.train(message)
            if message.stage == Stage.SECAGG:
                return self.secure_step(message)
        except WireVersionError as exc:  # another fedsite release: say so, in the reply and here
            log.error("round %d: cannot read the coordinator's message: %s", message.round, exc)
            return refusal(message.round, DeclineReason.WIRE_VERSION, str(exc), stage=Stage.ERROR)
        raise ClientError(f"unknown stage {message.stage!r}")

    # -- training -------------------------------------------------------------------------

    def train(self, message: Message) -> Message:
        """Train on the round's global state and reply with the update (``new - old``) and a report.

        Every check on a single update runs here, before anything leaves the client: the DP budget first
        (a refused round spends nothing), then finite values and client-level clipping and noise.
        """
        instruction = TrainInstruction.from_config(message.config)
        settings = TrainSettings(
            local_steps=instruction.local_steps, batch_size=instruction.batch_size, lr=instruction.lr,
            weight_decay=instruction.weight_decay, seed=instruction.seed, head_lr=instruction.head_lr,
            physical_batch_size=instruction.physical_batch_size,
        )
        global_state = {k: v for k, v in message.tensors.items() if not k.startswith(SECAGG_PREFIX)}
        load_trainable_state(self.model, global_state)
        local_dp = instruction.local_dp
        privatize: PrivatizeFn | None = None
        report: dict[str, Any] = {}
        if local_dp:
            ledger = self.ledger(local_dp.accountant)
            rounds_left = max(1, local_dp.rounds - message.round + 1)
            try:
                sigma, sample_rate = plan_noise_multiplier(
                    examples=len(self.examples), batch_size=settings.batch_size,
                    steps=rounds_left * settings.local_steps, delta=local_dp.delta, ledger=ledger,
                    target_epsilon=local_dp.target_epsilon,
                    noise_multiplier=local_dp.noise_multiplier if local_dp.target_epsilon is None else None)
                epsilon_after = check_budget(
                    ledger, noise_multiplier=sigma, sample_rate=sample_rate, steps=settings.local_steps,
                    delta=local_dp.delta, max_epsilon=local_dp.max_epsilon)
            except PrivacyBudgetExhausted as exc:
                log.warning("round %d: declining to train: privacy budget exhausted (%s)", message.round, exc)
                return refusal(message.round, DeclineReason.BUDGET_EXHAUSTED, str(exc),
                               report=ClientReport(epsilon=ledger.epsilon(local_dp.delta)))
            except PrivacyPlanError as exc:
                log.error("round %d: declining to train: %s", message.round, exc)
                return refusal(message.round, DeclineReason.DP_PLAN, f"DP plan: {exc}",
                               report=ClientReport(epsilon=ledger.epsilon(local_dp.delta)))

            head_fraction = local_dp.head_clip_fraction
            max_grad_norm = local_dp.max_grad_norm

            def privatize(model, optimizer, loader):
                groups = None
                if head_fraction > 0:  # the task head's share of the clipping bound (group-wise clipping)
                    head = [p for n, p in model.named_parameters() if p.requires_grad and is_head_parameter(model, n)]
                    groups = (head, head_fraction) if head else None
                return make_private(model, optimizer, loader, noise_multiplier=sigma,
                                    max_grad_norm=max_grad_norm, ledger=ledger, clip_groups=groups)

            report["epsilon_expected"] = epsilon_after
            report["noise_multiplier"] = sigma
        generator = data_generator(settings.seed, message.round, self.data_seed)
        prefix = self.frozen_prefix() if instruction.cache_frozen_prefix else None
        try:
            # dropout draws from torch's global RNG: seed it per (job, round, client data) so a round
            # is reproducible whichever process or driver runs it. DP noise has its own OS-seeded generator.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(generator.initial_seed()) ^ 0x5EED)
                result = train_steps(self.model, self.examples, settings, generator=generator, privatize=privatize,
                                     prefix=prefix)
        finally:
            if local_dp:  # Opacus wrapped what trained: the model's top over the cached states, or the model
                unwrap(prefix.view if prefix is not None else self.model)
        if local_dp:
            ledger.record(noise_multiplier=sigma, sample_rate=sample_rate, steps=settings.local_steps)
            report["epsilon"] = ledger.epsilon(local_dp.delta)
            report["delta"] = local_dp.delta
        new_state = trainable_state(self.model)
        delta = {name: new_state[name] - global_state[name].to(torch.float32) for name in new_state}
        if not all(torch.isfinite(t).all() for t in delta.values()):
            return refusal(message.round, DeclineReason.DIVERGED, "local training diverged (non-finite update)",
                           report=ClientReport(**report))
        client_dp = instruction.client_dp
        if client_dp:
            try:
                delta, norm = clip_update(delta, client_dp.clip_norm)
            except ClientDPError as exc:
                return refusal(message.round, DeclineReason.CLIENT_DP, str(exc), report=ClientReport(**report))
            report["update_norm"] = norm
            if client_dp.distributed:
                noise_seed = int.from_bytes(os.urandom(8), "little")  # predictable noise could be subtracted
                delta = distributed_noise_share(
                    delta, clip_norm=client_dp.clip_norm, noise_multiplier=client_dp.noise_multiplier,
                    num_clients=client_dp.num_clients, generator=torch.Generator().manual_seed(noise_seed))
        done = ClientReport(num_examples=len(self.examples), train_loss=result.loss, steps=result.steps,
                            seconds_train=result.seconds, **report)
        return Message(round=message.round, stage=Stage.TRAIN, tensors=delta, config=done.to_config())

    # -- secure aggregation ---------------------------------------------------------------

    def masked_input_vector(self, trained: Message, weight: float, clipping_range: float) -> np.ndarray:
        """What this client puts into the secure sum: its update times its weight, then weight x c.

        The weight coordinate is scaled by the quantizer's range c so that it stays on the grid whatever c is
        (the coordinator divides it back out and checks it against the weights clients declare).
        """
        return flatten_state(trained.tensors, scale=weight, tail=(weight * clipping_range,))

    def secure_step(self, message: Message) -> Message:
        """One SecAgg+ stage; at the masked-input stage, train first and mask the update."""
        payload = {k[len(SECAGG_PREFIX):]: v.numpy() for k, v in message.tensors.items()
                   if k.startswith(SECAGG_PREFIX)}
        try:
            instruction = SecAggInstruction.from_config(message.config)
            _, stage, _, _ = read_header(payload, "coordinator message")
            # the client that handles this message; it becomes this runtime's only once the message is accepted,
            # so a refused setup or keyed share_keys leaves the round in progress (and its secrets) as they were
            client = self.secagg
            if stage == SecAggStage.SETUP:
                client = SecAggPlusClient(instruction.client_index)
            elif is_keyed_share_keys(stage, payload):  # the round set up with keys this client made ahead
                if client is None:
                    raise ClientError("a round set up with keys this client made ahead, but it holds none "
                                      "(it restarted since); it takes part again from its next setup")
                client = client.reindexed(instruction.client_index)
            if client is None:
                raise ClientError(f"secure aggregation stage {stage!r} before setup")
            vector = None
            report: dict[str, Any] = {VERSION_KEY: WIRE_VERSION}
            if stage == SecAggStage.MASKED_INPUT:
                client.check(payload)  # before training: a replayed or out-of-order message spends no budget
                trained = self.train(message)
                if trained.stage != Stage.TRAIN:
                    return trained
                report = dict(trained.config)  # the training report, with the weight this client declares
                capped = min(1.0, len(self.examples) / instruction.weight_cap)
                weight = 1.0 if instruction.train is not None and instruction.train.client_dp else capped
                vector = self.masked_input_vector(trained, weight, client.state.clipping_range)
                report["secagg_weight"] = weight
            reply = client.handle(payload, input_vector=vector)
            self.secagg = client
        except WireVersionError:
            raise
        except (SecAggError, ClientError, KeyError, ValueError) as exc:
            log.warning("round %d: secure aggregation step refused: %s", message.round, exc)
            return refusal(message.round, DeclineReason.SECAGG, f"secure aggregation: {exc}", stage=Stage.ERROR)
        return Message(round=message.round, stage=Stage.SECAGG, config=report,
                       tensors=numpy_to_tensors({SECAGG_PREFIX + k: v for k, v in reply.items()}))
