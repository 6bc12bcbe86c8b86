"""Client-level DP on the coordinator: the noise it adds (central mode) and the job's ε."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from coordinator.config import JobConfig
from coordinator.rounds import RoundOutcome
from coordinator.strategy import State
from privacy.accounting import PrivacyLedger
from privacy.client_dp import central_noise, effective_noise_multiplier


class JobPrivacy:
    """Client-level DP on the coordinator: the noise it adds (central mode) and the job's ε."""

    def __init__(self, config: JobConfig, ledger_path: Path) -> None:
        self.config = config.privacy.client_dp
        self.ledger = PrivacyLedger(ledger_path if self.config.enabled else None)

    def finish_aggregate(self, outcome: RoundOutcome, sampled: int, enrolled: int,
                         record: dict[str, Any]) -> State:
        """The round's aggregate as the optimizer may use it: under client-level DP, with the coordinator's
        noise in central mode, and the round recorded in the job's ledger (ε goes into ``record``).

        Distributed noise is recorded at its effective σ, since dropped clients took their shares with them.
        """
        if not self.config.enabled:
            return outcome.delta
        completed = len(outcome.completed)
        delta = outcome.delta
        sigma = self.config.noise_multiplier
        if self.config.distributed:
            sigma = effective_noise_multiplier(sigma, num_clients=sampled, completed_clients=completed)
        else:
            # the mean of m clipped updates; noise of std sigma*S on the sum is sigma*S/m on the mean
            summed = {k: v * completed for k, v in delta.items()}
            seed = int.from_bytes(os.urandom(8), "little")
            noised = central_noise(summed, clip_norm=self.config.clip_norm, noise_multiplier=sigma,
                                   generator=torch.Generator().manual_seed(seed))
            delta = {k: v / completed for k, v in noised.items()}
        self.ledger.record(noise_multiplier=sigma, sample_rate=min(1.0, sampled / max(enrolled, 1)), steps=1)
        record["epsilon_client"] = self.ledger.epsilon(self.config.delta)
        record["delta_client"] = self.config.delta
        record["noise_multiplier_effective"] = sigma
        return delta
