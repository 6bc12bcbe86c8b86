"""Privacy accounting: pinned values, an independent library, composition across rounds
and restarts, and the budget check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from localio.atomic import atomic_write_text
from privacy.accounting import (
    PrivacyAccountingError,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    check_budget,
    epsilon_for_history,
)

DELTA = 1e-5


def _dp_accounting_event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def test_rdp_epsilon_pinned() -> None:
    eps = epsilon_for_history([(1.5, 0.04, 2250)], delta=DELTA)
    assert eps == pytest.approx(7.32911117143, abs=1e-6)


def test_rdp_agrees_with_dp_accounting() -> None:
    """Second setting against Google's dp_accounting RDP accountant, same RDP orders:
    relative tolerance 1e-6. (Both use the same RDP→(ε,δ) conversion; the RDP of the
    subsampled Gaussian is computed independently.)"""
    q, sigma, steps = 0.01, 1.1, 1000
    ours = epsilon_for_history([(sigma, q, steps)], delta=DELTA)
    ref = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    ref.compose(_dp_accounting_event(q, sigma, steps))
    assert ours == pytest.approx(ref.get_epsilon(DELTA), rel=1e-6)
    assert 1.0 < ours < 3.0  # a meaningful regime, not a degenerate one


def test_prv_agrees_with_dp_accounting_pld() -> None:
    """PRV (Opacus, upper bound with eps_error=0.01) vs PLD (dp_accounting): both are
    near-exact numerical accountants; they must agree within 0.05 in ε and PRV must not
    be below PLD by more than its stated error."""
    q, sigma, steps = 0.04, 1.5, 500
    prv = epsilon_for_history([(sigma, q, steps)], delta=DELTA, accountant="prv")
    pld = PLDAccountant()
    pld.compose(_dp_accounting_event(q, sigma, steps))
    ref = pld.get_epsilon(DELTA)
    assert abs(prv - ref) < 0.05
    assert prv > ref - 0.01
    rdp = epsilon_for_history([(sigma, q, steps)], delta=DELTA)
    assert prv < rdp  # RDP is the looser bound


def test_ledger_composes_across_rounds_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "client" / "ledger.json"
    rounds = [(1.1, 0.02, 30), (1.1, 0.02, 30), (0.9, 0.05, 10), (1.1, 0.02, 25)]
    ledger = PrivacyLedger(path)
    assert ledger.epsilon(DELTA) == 0.0
    for i, (sigma, q, steps) in enumerate(rounds):
        ledger.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
        if i == 1:  # restart between rounds
            ledger = PrivacyLedger(path)
    assert PrivacyLedger(path).history == rounds

    # Reference: one Opacus accountant stepping through every step of every round.
    one = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            one.step(noise_multiplier=sigma, sample_rate=q)
    assert PrivacyLedger(path).epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-12)
    assert ledger.epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-12)


def test_epsilon_after_does_not_record(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    before = (tmp_path / "l.json").read_bytes()
    after = ledger.epsilon_after(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=DELTA)
    assert after == pytest.approx(
        epsilon_for_history([(1.0, 0.1, 20)], delta=DELTA), rel=1e-12
    )
    assert ledger.history == [(1.0, 0.1, 10)]
    assert (tmp_path / "l.json").read_bytes() == before


def test_budget_check_refuses_the_round_that_would_exceed(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    plan: dict[str, Any] = {"noise_multiplier": 1.2, "sample_rate": 0.02, "steps": 50, "delta": DELTA}
    max_eps = 2.0
    accepted = 0
    with pytest.raises(PrivacyBudgetExhausted) as info:
        while True:
            after = check_budget(ledger, **plan, max_epsilon=max_eps)
            assert after <= max_eps
            ledger.record(noise_multiplier=1.2, sample_rate=0.02, steps=50)
            accepted += 1
    assert accepted >= 2
    assert ledger.epsilon(DELTA) <= max_eps  # the refused round was not recorded
    assert info.value.epsilon_after > max_eps
    assert len(PrivacyLedger(tmp_path / "l.json").history) == accepted


def test_accountants_and_errors(tmp_path: Path) -> None:
    history = [(1.2, 0.03, 100)]
    rdp = epsilon_for_history(history, delta=DELTA, accountant="rdp")
    gdp = epsilon_for_history(history, delta=DELTA, accountant="gdp")
    assert 0 < gdp < rdp * 1.5
    with pytest.raises(PrivacyAccountingError, match="gdp"):
        epsilon_for_history([(1.2, 0.03, 100), (1.0, 0.03, 5)], delta=DELTA, accountant="gdp")
    with pytest.raises(PrivacyAccountingError, match="accountant must be one of"):
        PrivacyLedger(None, accountant="moments")
    with pytest.raises(PrivacyAccountingError, match="sample_rate"):
        PrivacyLedger(None).record(noise_multiplier=1.0, sample_rate=1.5, steps=1)
    with pytest.raises(PrivacyAccountingError, match="delta"):
        PrivacyLedger(None).epsilon(0.0)
    bad = tmp_path / "bad.json"
    atomic_write_text(bad, "{not json")
    with pytest.raises(PrivacyAccountingError, match="corrupt privacy ledger"):
        PrivacyLedger(bad)


def test_ledger_file_is_plain_json_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, accountant="prv")
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    data = json.loads(path.read_text())
    assert data["accountant"] == "prv" and data["history"] == [[1.0, 0.1, 3]]
    assert [p.name for p in tmp_path.iterdir()] == ["l.json"]  # no temp file left behind


def test_a_failed_write_leaves_the_previous_ledger(tmp_path: Path) -> None:
    from localio.atomic import atomic_open

    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path)
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_open(path, "w") as handle:
        handle.write("{half a ledg")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.json"]
    assert PrivacyLedger(path).history == [(1.0, 0.1, 3)]
