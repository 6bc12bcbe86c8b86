"""The ``/api/status`` document: what a job is doing, built from its settings, records and live state.

A pure function of its inputs (no I/O, no clock unless given), so the live
server, the static ``report.html`` and the tests all build the same document
the same way. Field by field documentation: docs/dashboard.md. ``metrics`` is
``metrics.jsonl`` row for row; everything else is derived from those rows,
the job's settings and, while a job runs, the registry and the engine.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.config import JobConfig
    from coordinator.registry import ClientSeen

SCHEMA = 2  # 2: the engine's activity is "activity" (was "stage", which the wire uses for a message's kind)
METRIC_KEYS = ("val_accuracy", "val_perplexity")
TERMINAL = ("done", "failed", "stopped")
BUDGET_REASON = "privacy budget"  # what a client that declines for its ε budget says (client/runtime.py)
_STEP = re.compile(r"^(?P<what>.*?):\s*step\s+(?P<step>\d+)\s*/\s*(?P<steps>\d+)")

# engine.activity -> what a person reads; SecAgg+ stages not listed read "secure aggregation: <stage>"
ACTIVITY_LABELS = {
    "starting": "starting",
    "waiting for clients": "waiting for clients",
    "train": "training",
    "masked_input": "training (secure aggregation)",
    "aggregating": "aggregating",
    "evaluating": "evaluating",
    "checkpointing": "saving the checkpoint",
    "done": "exporting the final model",
}


@dataclass(frozen=True)
class JobInfo:
    """The job settings the dashboard shows; nothing secret (no paths to tokens or keys)."""

    name: str
    mode: str
    task: str = "classification"
    rounds: int = 0
    clients_per_round: int = 0
    min_clients: int = 0
    heartbeat_timeout_s: float = 60.0
    local_dp: bool = False
    local_budget: float | None = None
    local_delta: float | None = None
    client_dp: bool = False
    client_delta: float | None = None
    secure_aggregation: bool = False
    virtual_clients: int | None = None  # simulation: the clients exist up front (no registry)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobInfo:
        """From ``JobConfig.to_dict()`` (``job.toml.json`` in a run folder); missing keys take defaults."""
        job = data.get("job") or {}
        privacy = data.get("privacy") or {}
        local = privacy.get("local_dp") or {}
        client = privacy.get("client_dp") or {}
        sim = data.get("simulation") or {}
        # the same rule as LocalDPSection.budget (max_epsilon, else target_epsilon, else 8)
        budget = local.get("max_epsilon")
        if budget is None:
            budget = local.get("target_epsilon")
        if budget is None:
            budget = 8.0
        return cls(
            name=str(job.get("name", "")), mode=str(job.get("mode", "")),
            task=str((data.get("model") or {}).get("task", "classification")),
            rounds=int(job.get("rounds", 0)), clients_per_round=int(job.get("clients_per_round", 0)),
            min_clients=int(job.get("min_clients", 0)),
            heartbeat_timeout_s=float(job.get("heartbeat_timeout_s", 60.0)),
            local_dp=bool(local.get("enabled", False)),
            local_budget=float(budget) if local.get("enabled") else None,
            local_delta=float(local["delta"]) if local.get("enabled") and "delta" in local else None,
            client_dp=bool(client.get("enabled", False)),
            client_delta=float(client["delta"]) if client.get("enabled") and "delta" in client else None,
            secure_aggregation=bool((privacy.get("secure_aggregation") or {}).get("enabled", False)),
            virtual_clients=int(sim["clients"]) if sim.get("clients") else None,
        )

    @classmethod
    def from_config(cls, config: JobConfig) -> JobInfo:
        """The settings of a parsed job file (the live coordinator); :meth:`from_dict` serves saved runs."""
        return cls.from_dict(config.to_dict())


@dataclass(frozen=True)
class Phase:
    """What the job is doing: a ``status`` of a fixed set and a sentence for people."""

    status: str  # preparing | distilling | waiting_for_clients | running | done | failed | stopped
    text: str
    round: int | None = None  # the round in progress (None before the first)
    activity: str | None = None  # engine.activity while running
    step: int | None = None  # preparation progress (distillation)
    steps: int | None = None


def preparing_phase(text: str) -> Phase:
    """The coordinator's preparation report; "distilling the emulator: step 240/600, ..." has progress."""
    match = _STEP.match(text)
    if match is None:
        return Phase("preparing", f"preparing: {text}" if text else "preparing")
    step, steps = int(match["step"]), int(match["steps"])
    status = "distilling" if "distil" in match["what"] else "preparing"
    return Phase(status, f"{match['what']}: step {step} of {steps}", step=step, steps=steps)


def activity_label(activity: str) -> str:
    """What a person reads for ``engine.activity``: SecAgg+ stages not in the table are spelt out."""
    return ACTIVITY_LABELS.get(activity, f"secure aggregation: {activity.replace('_', ' ')}")


def engine_phase(info: JobInfo, round_id: int, activity: str, *, online: int | None = None) -> Phase:
    """A running engine: "round 3 of 5: training", or "waiting for clients" while it waits for a quorum."""
    if activity == "waiting for clients":
        need = f"{online} online, {info.min_clients} needed" if online is not None else ""
        text = f"round {round_id} of {info.rounds}: waiting for clients" + (f" ({need})" if need else "")
        return Phase("waiting_for_clients", text, round=round_id, activity=activity)
    if round_id == 0:
        return Phase("running", "evaluating the initial model", round=0, activity=activity)
    if activity == "done":
        return Phase("running", f"all {info.rounds} rounds run: exporting the final model", round=round_id,
                     activity=activity)
    return Phase("running", f"round {round_id} of {info.rounds}: {activity_label(activity)}", round=round_id,
                 activity=activity)


def finished_phase(info: JobInfo, records: list[dict[str, Any]], *, failure: str | None = None) -> Phase:
    """After the job: done (every round run), failed (with the reason), or stopped part way."""
    rounds = [r for r in records if _int(r.get("round")) > 0]
    last = _int(rounds[-1].get("round")) if rounds else 0
    if failure is not None:
        return Phase("failed", f"failed: {failure}", round=last or None)
    ok = sum(1 for r in rounds if r.get("status") == "ok")
    failed = len(rounds) - ok
    metric = metric_key(records)
    value = _last_number(records, metric) if metric else None
    digits = ".4f" if metric == "val_accuracy" else ".4g"
    shown = f"; {metric} {value:{digits}}" if metric and value is not None else ""
    tally = f"{ok} ok" + (f", {failed} failed" if failed else "")
    if info.rounds and last >= info.rounds:
        return Phase("done", f"done: {info.rounds} rounds ({tally}){shown}", round=last)
    return Phase("stopped", f"stopped after round {last} of {info.rounds} ({tally}){shown}", round=last or None)


def metric_key(records: Iterable[dict[str, Any]]) -> str | None:
    """The validation metric the records carry (accuracy for classification, perplexity for causal LM), or None."""
    records = list(records)
    return next((k for k in METRIC_KEYS if any(_number(r.get(k)) is not None for r in records)), None)


def client_table(info: JobInfo, records: list[dict[str, Any]], live: list[ClientSeen] | None, *,
                 liveness: bool = True) -> list[dict[str, Any]]:
    """One row per client: enrolment and liveness (registry), and its history across rounds (records).
    ``liveness`` False: the registry was read from disk after the job, so nobody is online or offline."""
    rows: dict[str, dict[str, Any]] = {}

    def row(cid: str) -> dict[str, Any]:
        if cid not in rows:
            rows[cid] = {"id": cid, "name": "", "enrolled": False, "enrolled_at": None, "online": None,
                         "last_seen_s": None, "sampled": 0, "completed": 0, "dropped": 0,
                         "declined_budget": 0, "last_drop": None, "epsilon": None}
        return rows[cid]

    if info.virtual_clients is not None and live is None:
        from_partition = [f"client-{i:05d}" for i in range(info.virtual_clients)]  # simulations.flower_driver ids
        for cid in from_partition:
            row(cid)["enrolled"] = True
    for seen in live or []:
        r = row(seen.client_id)
        r.update(name=seen.name, enrolled=True, enrolled_at=seen.enrolled_at)
        if liveness:
            since = seen.seconds_since_seen
            r.update(last_seen_s=since, online=since is not None and since <= info.heartbeat_timeout_s)
    for record in records:
        round_id = _int(record.get("round"))
        if round_id < 1:
            continue
        for cid in record.get("sampled_client_ids") or []:
            row(str(cid))["sampled"] += 1
        for cid in record.get("completed_client_ids") or []:
            row(str(cid))["completed"] += 1
        budget = {str(c) for c in record.get("budget_exhausted_clients") or []}
        for cid, reason in (record.get("drop_reasons") or {}).items():
            r = row(str(cid))
            if str(cid) in budget or BUDGET_REASON in str(reason):
                r["declined_budget"] += 1
            else:
                r["dropped"] += 1
            r["last_drop"] = {"round": round_id, "reason": str(reason)}
        for cid in budget - set(record.get("drop_reasons") or {}):
            row(cid)["declined_budget"] += 1
        for cid, eps in (record.get("epsilon_local") or {}).items():
            value = _number(eps)
            if value is not None:
                row(str(cid))["epsilon"] = value
    return [rows[cid] for cid in sorted(rows)]


def epsilon_summary(info: JobInfo, records: list[dict[str, Any]], clients: list[dict[str, Any]]) -> dict[str, Any]:
    """ε as the page shows it: per client against its budget (sample-level DP) and the job's (client-level DP)."""
    per_client = {c["id"]: c["epsilon"] for c in clients if c["epsilon"] is not None}
    local: dict[str, Any] = {"enabled": info.local_dp}
    if info.local_dp:
        local.update(budget=info.local_budget, delta=info.local_delta, clients=per_client,
                     max=_last_number(records, "epsilon_local_max"))
    client: dict[str, Any] = {"enabled": info.client_dp}
    if info.client_dp:
        client.update(epsilon=_last_number(records, "epsilon_client"), delta=info.client_delta)
    return {"local": local, "client": client}


def last_failure(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest failed round and its reason: the job went on, but the page should still say so."""
    for record in reversed(records):
        if record.get("status") == "failed":
            return {"round": _int(record.get("round")), "reason": str(record.get("failure", "no reason recorded"))}
    return None


def build_status(info: JobInfo, phase: Phase, records: list[dict[str, Any]], *,
                 live_clients: list[ClientSeen] | None = None, source: str = "coordinator",
                 now: float | None = None) -> dict[str, Any]:
    """The whole document; ``records`` are the rows of metrics.jsonl in order. A ``report`` (a finished
    run read from disk) may pass the registry's clients, but says nothing about who is online."""
    liveness = source != "report"
    clients = client_table(info, records, live_clients, liveness=liveness)
    finished = [r for r in records if _int(r.get("round")) > 0]
    completed_rounds = _int(finished[-1].get("round")) if finished else 0
    round_now = phase.round if phase.round is not None else completed_rounds
    metric = metric_key(records)
    online = [c for c in clients if c["online"]] if live_clients is not None and liveness else None
    settings = {k: v for k, v in asdict(info).items() if k not in ("name", "mode")}
    return {
        "schema": SCHEMA,
        "source": source,
        "job": info.name,
        "mode": info.mode,
        "status": phase.status,
        "status_text": phase.text,
        "final": phase.status in TERMINAL,
        "activity": phase.activity,
        "progress": {"step": phase.step, "steps": phase.steps} if phase.steps else None,
        "round": round_now,
        "rounds": info.rounds,
        "completed_rounds": completed_rounds,
        "metric": metric,
        "metric_higher_is_better": metric != "val_perplexity",
        "settings": settings,
        "clients_summary": {
            "enrolled": sum(1 for c in clients if c["enrolled"]),
            "online": len(online) if online is not None else None,
            "per_round": info.clients_per_round,
            "min": info.min_clients,
        },
        "clients": clients,
        "epsilon": epsilon_summary(info, records, clients),
        "last_failure": last_failure(records),
        "metrics": records,
        "updated_at": time.time() if now is None else now,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _last_number(records: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(records):
        value = _number(record.get(key))
        if value is not None:
            return value
    return None
