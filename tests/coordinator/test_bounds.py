"""The contribution bounds: what an honest client's AdamW can send at most, checked against torch and the trainer.

If the client's optimizer changes (another optimizer, other betas), the real-trainer test below fails: the
bounds would then refuse honest clients or let hostile ones go further than documented.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.runtime import ClientRuntime
from coordinator.bounds import (
    HONEST_MARGIN,
    adam_step_factor,
    adam_travel,
    plain_update_bound,
    secure_clipping_range,
)
from coordinator.config import parse_job
from coordinator.job import prepare_job
from coordinator.strategy import update_norm
from localio.data import read_examples, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def test_adam_factor_starts_at_one_and_stays_below_its_limit() -> None:
    factors = [adam_step_factor(t) for t in (1, 2, 10, 30, 1000, 100_000)]
    assert factors[0] == pytest.approx(1.0)
    assert factors == sorted(factors) and factors[-1] < 7.3
    assert adam_travel(3) == pytest.approx(sum(adam_step_factor(t) for t in (1, 2, 3)))


GRADIENTS = st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([0.0, 1e-12, -1e-12, 1.0, -1.0]),
                     min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(gradients=GRADIENTS, lr=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_no_gradient_sequence_moves_adamw_further_than_the_bound(gradients: list[float], lr: float) -> None:
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.0)
    for g in gradients:
        param.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
    assert abs(float(param.detach())) <= lr * adam_travel(len(gradients)) * (1 + 1e-9)


def test_the_real_trainer_stays_within_both_bounds(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Large learning rates and weight decay on the real trainer: the honest update fits the bounds without
    their margin, and the bounds are not vacuous (an honest update reaches a real fraction of them)."""
    rows = read_examples(VALIDATION, need_label=True)
    random.Random(0).shuffle(rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:600])
    table = {"job": {"name": "b", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
             "model": {"path": str(tiny_bert_dir), "max_length": 32},
             "data": {"validation": str(tmp_path / "val.jsonl"), "validation_max_examples": 50},
             "train": {"local_steps": 4, "batch_size": 8, "lr": 0.05, "head_lr": 0.1, "weight_decay": 0.5},
             "lora": {"r": 4}}
    config = parse_job(table, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    runtime = ClientRuntime.from_package(job.package.folder, rows[:60], state_dir=None)
    message = job.engine.train_message(1, 1)
    reply = runtime.handle(message)
    assert reply.stage == "train"
    norm = update_norm(reply.tensors)
    largest = max(float(t.abs().max()) for t in reply.tensors.values())
    plain = plain_update_bound(config, message.tensors, 1)
    coordinate = secure_clipping_range(config, message.tensors, 1)
    assert norm <= plain / HONEST_MARGIN and largest <= coordinate / HONEST_MARGIN
    assert norm > 0.05 * plain and largest > 0.2 * coordinate  # the bounds are near what honest clients send
    # a job may also fix them
    table["server"] = {"max_update_norm": 3.0}
    table["privacy"] = {"secure_aggregation": {"enabled": True, "clipping_range": 0.25}}
    fixed = parse_job(table, tmp_path)
    assert plain_update_bound(fixed, message.tensors, 1) == 3.0
    assert secure_clipping_range(fixed, message.tensors, 1) == 0.25


def test_client_dp_bounds_allow_the_clip_norm_and_the_noise_share(tmp_path: Path) -> None:
    state = {"w": torch.zeros(10_000)}
    table = {"privacy": {"client_dp": {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.0}},
             "train": {"lr": 1.0, "local_steps": 30}}
    config = parse_job(table, tmp_path)
    from privacy.client_dp import clip_update, distributed_noise_share

    worst_norm, worst_coordinate = 0.0, 0.0
    for seed in range(20):
        update, _ = clip_update({"w": torch.randn(10_000, generator=torch.Generator().manual_seed(seed))}, 0.5)
        noised = distributed_noise_share(update, clip_norm=0.5, noise_multiplier=1.0, num_clients=4,
                                         generator=torch.Generator().manual_seed(100 + seed))
        worst_norm = max(worst_norm, update_norm(noised))
        worst_coordinate = max(worst_coordinate, float(noised["w"].abs().max()))
    assert worst_norm <= plain_update_bound(config, state, 4) <= 1.2 * worst_norm
    assert worst_coordinate <= secure_clipping_range(config, state, 4)
    central = parse_job({**table, "privacy": {"client_dp": {"enabled": True, "clip_norm": 0.5,
                                                             "distributed": False}}}, tmp_path)
    assert plain_update_bound(central, state, 4) == pytest.approx(0.5, rel=1e-4)
