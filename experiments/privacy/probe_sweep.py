"""The recipe search on cached features: FedAvg of DP-SGD linear probes (the task head on the
mean-pooled features, through the pooler's tanh), mirroring the default job's client loop: the same
10-client Dirichlet(0.5) partition, clients sampled per round as the engine samples them, Poisson
batches, per-sample clipping and Gaussian noise, σ calibrated per client with fedsite's own
accounting for the rounds left (privacy/accounting.plan_noise_multiplier), AdamW on the client,
FedAvg weights min(1, n/10000). Each run costs seconds, so rounds x steps x batch x lr can be swept
before a real job confirms the best (the real job adds LoRA on the pooler and runs the engine).

    python experiments/privacy/probe_features.py            # once
    python experiments/privacy/probe_sweep.py '{"B": 1024, "L": 25, "R": 8, "lr": 1e-2}' '{"eps": 0, ...}'

Keys: eps (0 = no DP), B (expected batch), L (local steps), R (rounds), K (clients per round), lr,
C (clip), seed, central (one client with all the data: R x L steps on the pooled set),
partition and alpha (the simulation's split of the 10 clients).
Prints one line per run: the settings, accuracy on the whole validation split, ε.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from coordinator.config import load_job  # noqa: E402
from privacy.accounting import PrivacyLedger, plan_noise_multiplier  # noqa: E402
from simulations.runner import SimulationOptions, apply_overrides, partition_table  # noqa: E402

FEATURES = "/tmp/fedsite-probe-features.pt"


def run(eps: float = 8.0, B: int = 512, L: int = 10, R: int = 10, K: int = 5, lr: float = 1e-2,
        C: float = 1.0, seed: int = 0, central: bool = False, partition: str = "dirichlet", alpha: float = 0.5,
        features: str = FEATURES) -> tuple[float, float | None]:
    torch.set_num_threads(1)
    d = torch.load(features)
    x_train, y_train, x_val, y_val = torch.tanh(d["Xtr"]), d["ytr"], torch.tanh(d["Xva"]), d["yva"]
    config = load_job(ROOT / "simulations" / "configs" / "default.toml")
    assert config.simulation is not None
    config.simulation.partition, config.simulation.alpha = partition, alpha
    table = partition_table(apply_overrides(config, SimulationOptions()))
    if central:  # the reference without federation: one client holding every example, every round
        table, K = [list(range(len(x_train)))], 1
    g = torch.Generator().manual_seed(seed)
    classes, hidden = int(y_train.max()) + 1, x_train.shape[1]
    weight, bias = torch.zeros(classes, hidden), torch.zeros(classes)
    ledgers = [PrivacyLedger(None) for _ in table]
    for r in range(1, R + 1):
        sampled = sorted(random.Random(f"{seed}:{r}").sample(range(len(table)), K))
        d_weight, d_bias, total = torch.zeros_like(weight), torch.zeros_like(bias), 0.0
        for c in sampled:
            idx = torch.tensor(table[c])
            n = len(idx)
            if eps:
                sigma, q = plan_noise_multiplier(examples=n, batch_size=B, steps=(R - r + 1) * L, delta=1e-5,
                                                 ledger=ledgers[c], target_epsilon=eps)
            else:
                sigma, q = 0.0, B / n
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0)
            for _ in range(L):
                mask = torch.rand(n, generator=g) < q
                x, y = x_train[idx[mask]], y_train[idx[mask]]
                p = (x @ w.detach().T + b.detach()).softmax(-1)
                p[torch.arange(len(y)), y] -= 1  # d loss / d logits, per example
                g_w, g_b = p[:, :, None] * x[:, None, :], p
                norms = (g_w.flatten(1).pow(2).sum(1) + g_b.pow(2).sum(1)).sqrt()
                f = (C / (norms + 1e-6)).clamp(max=1) if eps else torch.ones(len(y))
                s_w = (f[:, None, None] * g_w).sum(0) + sigma * C * torch.randn(w.shape, generator=g)
                s_b = (f[:, None] * g_b).sum(0) + sigma * C * torch.randn(b.shape, generator=g)
                w.grad, b.grad = s_w / B, s_b / B
                opt.step()
            if eps:
                ledgers[c].record(noise_multiplier=sigma, sample_rate=q, steps=L)
            share = min(1.0, n / 10000)
            d_weight += share * (w.detach() - weight)
            d_bias += share * (b.detach() - bias)
            total += share
        weight, bias = weight + d_weight / total, bias + d_bias / total
    accuracy = float(((x_val @ weight.T + bias).argmax(-1) == y_val).float().mean())
    spent = max(ledger.epsilon(1e-5) for ledger in ledgers) if eps else None
    return round(accuracy, 4), (round(spent, 2) if spent is not None else None)


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        settings = json.loads(spec)
        print(json.dumps({**settings, "result": run(**settings)}), flush=True)
