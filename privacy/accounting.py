"""Privacy accounting across rounds and restarts: a persisted history over Opacus accountants.

A client trains a few dozen DP-SGD steps per round, for many rounds, possibly across
process restarts. Its ε is the composition of *all* those steps, so the history of
(noise multiplier, sample rate, steps) is what must survive, not an ε number: ε is
recomputed from the full history by a fresh Opacus accountant every time it is asked.
Keeping the raw history also lets the same ledger be re-read with another accountant.

Pure bookkeeping: no torch, no model. The same ledger serves client-level DP for a job
(one "step" per round, sample rate = clients per round / clients).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.optimize import brentq

from localio.atomic import atomic_write_json

ACCOUNTANTS = ("rdp", "prv", "gdp")
_FORMAT_VERSION = 1

# One entry of accountant history: (noise_multiplier, sample_rate, steps).
Entry = tuple[float, float, int]


class PrivacyAccountingError(ValueError):
    """Bad accounting input (unknown accountant, out-of-range σ / q / δ, corrupt ledger)."""


class PrivacyBudgetExhausted(Exception):
    """The next round would take ε past the allowed maximum; the round must not run."""

    def __init__(self, epsilon_after: float, max_epsilon: float, epsilon_spent: float) -> None:
        self.epsilon_after = epsilon_after
        self.max_epsilon = max_epsilon
        self.epsilon_spent = epsilon_spent
        super().__init__(
            f"privacy budget exhausted: this round would take ε from {epsilon_spent:.4g} to "
            f"{epsilon_after:.4g}, above max_epsilon = {max_epsilon:.4g}"
        )


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise PrivacyAccountingError(
            f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}"
        )
    return accountant


def _check_entry(noise_multiplier: float, sample_rate: float, steps: int) -> Entry:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyAccountingError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not (0 < sample_rate <= 1):
        raise PrivacyAccountingError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise PrivacyAccountingError(f"steps must be a non-negative integer, got {steps}")
    return (float(noise_multiplier), float(sample_rate), int(steps))


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise PrivacyAccountingError(f"delta must be in (0, 1), got {delta}")


def _merged(history: Sequence[Entry]) -> list[Entry]:
    """Drop zero-step entries and merge neighbours with equal (σ, q): same ε, fewer terms."""
    merged: list[Entry] = []
    for sigma, q, steps in history:
        if steps == 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at Opacus' default orders (cached: a ledger's history and a
    calibration's candidates repeat the same (σ, q) many times, and one evaluation costs ~0.1 s)."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    return tuple(float(x) for x in rdp)


def _rdp_epsilon(history: Sequence[Entry], delta: float) -> float:
    """What Opacus' RDPAccountant.get_epsilon returns for ``history``, from the cached per-step RDP."""
    total = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
    for sigma, q, steps in history:
        total += steps * np.asarray(_rdp_per_step(sigma, q))
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


def _new_accountant(accountant: str) -> IAccountant:
    with warnings.catch_warnings():  # the GDP accountant warns on every construction
        warnings.simplefilter("ignore")
        return create_accountant(mechanism=accountant)


def epsilon_for_history(history: Sequence[Entry], *, delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of every entry in ``history`` under ``accountant``.

    ``gdp`` (Gaussian DP, CLT-based, can under-estimate ε) only supports a history with a
    single (σ, q) pair; a mixed history raises PrivacyAccountingError.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    merged = _merged(history)
    if not merged:
        return 0.0
    if accountant == "gdp" and len(merged) > 1:
        raise PrivacyAccountingError(
            "accountant 'gdp' needs one noise multiplier and sample rate for the whole "
            "history; use 'rdp' or 'prv' when they change between rounds"
        )
    if accountant == "rdp":
        return _rdp_epsilon(merged, delta)
    acct = _new_accountant(accountant)
    acct.history = [(s, q, n) for s, q, n in merged]
    return float(acct.get_epsilon(delta=delta))


class PrivacyLedger:
    """A client's (or a job's) accountant history persisted as JSON, so ε composes across
    rounds and restarts.

    The file is rewritten atomically on every ``record`` (a crash leaves the previous
    history, never a truncated one). ``path=None`` keeps the ledger in memory only.
    """

    def __init__(self, path: Path | None, accountant: str = "rdp") -> None:
        self.path = Path(path) if path is not None else None
        self.accountant = _check_accountant(accountant)
        self._history: list[Entry] = []
        if self.path is not None and self.path.exists():
            self._history = self._load(self.path)

    def _load(self, path: Path) -> list[Entry]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored = data["accountant"]
            rows = data["history"]
            history = [_check_entry(float(s), float(q), int(n)) for s, q, n in rows]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PrivacyAccountingError(f"corrupt privacy ledger {path}: {err}") from err
        if stored != self.accountant:
            # The history is mechanism-agnostic; say so rather than silently switching.
            warnings.warn(
                f"privacy ledger {path} was written with accountant {stored!r}; "
                f"re-reading its history with {self.accountant!r}",
                stacklevel=3,
            )
        return history

    def _save(self) -> None:
        if self.path is None:
            return
        atomic_write_json(
            self.path,
            {
                "version": _FORMAT_VERSION,
                "accountant": self.accountant,
                "history": [list(entry) for entry in self._history],
            },
        )

    @property
    def history(self) -> list[Entry]:
        """Every recorded (noise_multiplier, sample_rate, steps), oldest first (a copy)."""
        return list(self._history)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``; 0.0 with an empty history."""
        return epsilon_for_history(self._history, delta=delta, accountant=self.accountant)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """What ε would be after ``steps`` more steps at (σ, q), without recording them."""
        entry = _check_entry(noise_multiplier, sample_rate, steps)
        return epsilon_for_history(
            [*self._history, entry], delta=delta, accountant=self.accountant
        )

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append ``steps`` steps at (σ, q) and save the ledger atomically."""
        entry = _check_entry(noise_multiplier, sample_rate, steps)
        self._history.append(entry)
        try:
            self._save()
        except BaseException:
            self._history.pop()  # memory and disk must agree
            raise


def check_budget(
    ledger: PrivacyLedger,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    max_epsilon: float,
) -> float:
    """ε after the planned round; raises PrivacyBudgetExhausted when it would exceed max_epsilon.

    Call before training: a refused round spends nothing.
    """
    after = ledger.epsilon_after(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
    )
    if after > max_epsilon:
        raise PrivacyBudgetExhausted(after, max_epsilon, ledger.epsilon(delta))
    return after


def noise_multiplier_for(
    target_epsilon: float,
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    ledger: PrivacyLedger,
    tolerance: float | None = None,
) -> float:
    """Smallest noise multiplier such that ``steps`` more steps at ``sample_rate`` bring the ledger's
    total ε to ``target_epsilon``, from below, to within ``tolerance`` (default 0.1 % of the target).

    What Opacus' ``make_private_with_epsilon`` does for one training run, on top of a history (earlier
    rounds, other restarts). Raises PrivacyBudgetExhausted when the ledger has already spent the target
    or even σ = 1000 would overshoot it.
    """
    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # candidates far below the answer have ε at the smallest RDP order
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return ledger.epsilon_after(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)

    if steps == 0:
        return 0.0
    tolerance = 1e-3 * target_epsilon if tolerance is None else tolerance
    spent = ledger.epsilon(delta)
    if not math.isfinite(target_epsilon) or target_epsilon <= spent:
        raise PrivacyBudgetExhausted(spent, target_epsilon, spent)
    hint = ledger.history[-1][0] if ledger.history else None
    if hint is not None and 0 <= target_epsilon - eps(hint) <= tolerance:
        return hint  # the last round's σ still lands on the target (the client took part in every round)
    low, high = 0.25, 1.0  # ε(σ) falls as σ grows: bracket the target, then Brent's method in log σ
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1000:
            raise PrivacyBudgetExhausted(eps(1000.0), target_epsilon, spent)
    while low > 1e-3 and eps(low) <= target_epsilon:
        low, high = low / 2, low
    root = math.exp(brentq(lambda log_sigma: eps(math.exp(log_sigma)) - target_epsilon, math.log(low),
                           math.log(high), xtol=1e-7, rtol=1e-7))
    sigma = min(max(root, low), high)
    while eps(sigma) > target_epsilon:  # land on the safe side of the target
        sigma *= 1 + 1e-6
    if target_epsilon - eps(sigma) > tolerance:  # Brent stopped short of the tolerance: walk up the bracket
        sigma = _bisect_down(eps, target_epsilon, low, sigma, tolerance)
    return sigma


def _bisect_down(eps: Callable[[float], float], target: float, low: float, high: float, tolerance: float) -> float:
    """The smallest σ in (low, high] with target - tolerance <= ε(σ) <= target (ε(high) <= target)."""
    while high - low > 1e-9:
        mid = (low + high) / 2
        value = eps(mid)
        if value > target:
            low = mid
        else:
            high = mid
            if target - value <= tolerance:
                break
    return high


class PrivacyPlanError(ValueError):
    """A DP-SGD plan that a client's data cannot carry (the message says what to change)."""


# Past this, each step's noise on the averaged gradient has a standard deviation of at least a quarter of
# the clipping bound per coordinate: the update is noise.
MAX_NOISE_PER_EXAMPLE = 0.25


def plan_noise_multiplier(
    *,
    examples: int,
    batch_size: int,
    steps: int,
    delta: float,
    ledger: PrivacyLedger,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
) -> tuple[float, float]:
    """(noise multiplier, sample rate) for ``steps`` more DP-SGD steps of a client holding ``examples``.

    With ``target_epsilon`` the noise is calibrated so that the planned steps land the ledger on the
    target; otherwise ``noise_multiplier`` is used as given. Raises PrivacyPlanError (one line saying
    what to change) when the client holds fewer examples than one logical batch or the calibrated noise
    would drown the update, and PrivacyBudgetExhausted when the ledger has spent the target already.
    """
    if examples <= 0:
        raise PrivacyPlanError("this client holds no examples")
    if target_epsilon is None:
        if noise_multiplier is None:
            raise PrivacyPlanError("a DP-SGD plan needs noise_multiplier or target_epsilon")
        return noise_multiplier, min(1.0, batch_size / examples)  # every step sees all data past one batch
    if examples < batch_size:
        raise PrivacyPlanError(
            f"this client holds {examples} examples, fewer than one logical batch ([train] batch_size = "
            f"{batch_size}), so the noise cannot be calibrated to batches of that size; lower batch_size to at "
            f"most {examples} or give the client more data")
    sample_rate = batch_size / examples
    sigma = noise_multiplier_for(target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta, ledger=ledger)
    if sigma / batch_size > MAX_NOISE_PER_EXAMPLE:
        spent = ledger.epsilon(delta)
        already = f" from the {spent:.3g} already spent" if spent > 0 else ""
        raise PrivacyPlanError(
            f"reaching ε = {target_epsilon:g}{already} in {steps} steps at batch {batch_size} of {examples} "
            f"examples needs noise multiplier {sigma:.3g}: its noise would drown every update; plan fewer steps "
            "(job rounds x local_steps), a larger batch_size or target_epsilon, or give clients more data")
    return sigma, sample_rate
