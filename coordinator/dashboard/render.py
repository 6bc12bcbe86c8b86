"""The dashboard page, from a status document: live (polled by a small script) or static (report.html).

Read top to bottom, a person sees what the job is doing (the status line and
round progress), whether anything is wrong (a failed job, the last failed
round), the few numbers that matter now (metric, loss, clients, ε, bytes,
time), then the curves and the client table. Everything interpolated is
escaped: client names and drop reasons come from clients.
"""

from __future__ import annotations

import math
import time
from html import escape
from typing import Any

from coordinator.dashboard import assets
from coordinator.dashboard.svg import Layer, Series, bar_chart, fmt, hbar_chart, line_chart

POLL_MS = 2000
MAX_CLIENT_ROWS = 100
MAX_EPSILON_BARS = 24
COLORS = {"metric": "#2563eb", "loss": "#ea580c", "down": "#2563eb", "up": "#16a34a", "eps_local": "#0d9488",
          "eps_client": "#7c3aed", "train": "#2563eb", "transfer": "#93c5fd", "aggregate": "#a855f7",
          "evaluate": "#f59e0b", "other": "#d1d5db"}
METRIC_NAMES = {"val_accuracy": "validation accuracy", "val_perplexity": "validation perplexity"}


def render_page(status: dict[str, Any], *, live: bool) -> str:
    """The whole page. ``live``: CSS and script are fetched from the server (which forbids inline code);
    otherwise both are inlined and nothing is fetched, so the file opens from disk."""
    head_assets = ('<link rel="stylesheet" href="static/dashboard.css">' if live
                   else f"<style>{assets.CSS}</style>")
    script = '<script src="static/dashboard.js" defer></script>' if live else ""
    banner = '<div id="connection" class="connection" role="status" hidden></div>' if live else ""
    poll = f' data-poll-ms="{POLL_MS}"' if live else ""
    title = f"{status.get('job') or 'job'} · fedsite"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><link rel=\"icon\" href=\"data:,\">{head_assets}</head>"
            f"<body>{banner}<main id=\"dashboard\"{poll}>{render_fragment(status)}</main>{script}</body></html>\n")


def render_fragment(status: dict[str, Any]) -> str:
    """Everything inside <main>: what the live page swaps in on each poll."""
    records: list[dict[str, Any]] = status.get("metrics") or []
    final = ' data-final="1"' if status.get("final") else ""
    parts = [f'<div class="wrap" data-status="{escape(str(status.get("status")))}" '
             f'data-round="{status.get("round")}" data-completed-rounds="{status.get("completed_rounds")}"{final}>',
             _header(status), _alerts(status), _kpis(status, records), _charts(status, records),
             _clients(status), _footer(status), "</div>"]
    return "".join(parts)


# -- header and alerts ---------------------------------------------------------------------


def _header(status: dict[str, Any]) -> str:
    settings = status.get("settings") or {}
    tags = [str(status.get("mode") or ""), str(status.get("source") or "")]
    if settings.get("local_dp"):
        tags.append("sample-level DP")
    if settings.get("client_dp"):
        tags.append("client-level DP")
    if settings.get("secure_aggregation"):
        tags.append("SecAgg+")
    tag_html = "".join(f'<span class="tag">{escape(t)}</span>' for t in tags if t)
    state = str(status.get("status"))
    rounds, done = int(status.get("rounds") or 0), int(status.get("completed_rounds") or 0)
    progress = status.get("progress")
    if progress and not status.get("final"):
        bar = (f'<progress max="{progress["steps"]}" value="{progress["step"]}"></progress>'
               f'<span>{progress["step"]} of {progress["steps"]} steps</span>')
    else:
        bar = (f'<progress max="{max(rounds, 1)}" value="{min(done, rounds)}"></progress>'
               f'<span>{done} of {rounds} rounds done</span>')
    return (f'<header class="head"><div class="id"><h1>{escape(str(status.get("job") or "job"))}</h1>{tag_html}'
            f'</div><div class="state state-{escape(state)}"><span class="dot"></span>'
            f'<span class="state-text" id="status-text">{escape(str(status.get("status_text") or state))}</span>'
            f'</div><div class="bar">{bar}</div></header>')


def _alerts(status: dict[str, Any]) -> str:
    out = []
    if status.get("status") == "failed":
        out.append(f'<div class="alert alert-bad"><strong>The job failed.</strong> '
                   f'{escape(str(status.get("status_text", "")).removeprefix("failed: "))}</div>')
    failure = status.get("last_failure")
    if failure:
        out.append(f'<div class="alert alert-warn" id="last-failure"><strong>Round {failure["round"]} failed:'
                   f'</strong> {escape(failure["reason"])} <span class="muted">(the model kept its previous '
                   f'weights; the job went on)</span></div>')
    return "".join(out)


# -- key figures ---------------------------------------------------------------------------


def _kpi(key: str, value: str, detail: str, *, kpi_id: str, tone: str = "") -> str:
    return (f'<div class="kpi" id="{kpi_id}"><div class="k">{escape(key)}</div>'
            f'<div class="v">{value}</div><div class="d {tone}">{detail}</div></div>')


def _kpis(status: dict[str, Any], records: list[dict[str, Any]]) -> str:
    metric = status.get("metric")
    rounds = [r for r in records if _round(r) > 0]
    cards = []
    points = _points(records, metric) if metric else []
    if metric and points:
        last, first = points[-1][1], points[0][1]
        change = last - first
        better = change > 0 if status.get("metric_higher_is_better", True) else change < 0
        tone = "good" if better else ("bad" if change else "")
        detail = f"{'+' if change >= 0 else '−'}{abs(change):.4f} since round {points[0][0]:g}" \
            if len(points) > 1 else f"round {points[-1][0]:g}"
        cards.append(_kpi(METRIC_NAMES.get(metric, metric), f"{last:.4f}", escape(detail), kpi_id="kpi-metric",
                          tone=tone))
    else:
        cards.append(_kpi("validation", "–", "no evaluation yet", kpi_id="kpi-metric"))
    losses = _points(records, "train_loss")
    cards.append(_kpi("train loss", fmt(losses[-1][1]) if losses else "–",
                      escape(f"round {losses[-1][0]:g}") if losses else "no training round yet", kpi_id="kpi-loss"))
    summary = status.get("clients_summary") or {}
    online, enrolled = summary.get("online"), summary.get("enrolled", 0)
    value = f"{online} <small>/ {enrolled}</small>" if online is not None else f"{enrolled}"
    kind = "online / enrolled" if online is not None else \
        ("virtual clients" if status.get("source") == "simulation" else "enrolled")
    detail = f"{kind} · {summary.get('per_round', 0)} per round, min {summary.get('min', 0)}"
    if rounds:
        r = rounds[-1]
        detail += (f"<br>round {_round(r)}: {r.get('completed_clients', 0)} of {r.get('sampled_clients', 0)} "
                   f"completed" + (f", {r.get('dropped_clients')} dropped" if r.get("dropped_clients") else ""))
    cards.append(_kpi("clients", value, detail, kpi_id="kpi-clients"))
    cards.append(_epsilon_kpi(status))
    down = sum(_num(r.get("bytes_down")) for r in rounds)
    up = sum(_num(r.get("bytes_up")) for r in rounds)
    cards.append(_kpi("data moved", _mb(down + up), f"{_mb(down)} down · {_mb(up)} up", kpi_id="kpi-bytes"))
    seconds = [_num(r.get("seconds")) for r in rounds]
    cards.append(_kpi("round time", f"{sum(seconds) / len(seconds):.1f} s" if seconds else "–",
                      f"mean of {len(seconds)} rounds · {_duration(sum(_num(r.get('seconds')) for r in records))}"
                      " in all" if seconds else "no round finished yet", kpi_id="kpi-time"))
    return f'<section class="kpis">{"".join(cards)}</section>'


def _epsilon_kpi(status: dict[str, Any]) -> str:
    eps = status.get("epsilon") or {}
    local, client = eps.get("local") or {}, eps.get("client") or {}
    if not local.get("enabled") and not client.get("enabled"):
        return _kpi("privacy (ε)", "off", "no differential privacy in this job", kpi_id="kpi-epsilon")
    details = []
    if local.get("enabled"):
        spent, budget = local.get("max"), local.get("budget")
        value = f"{spent:.2f} <small>of {budget:g}</small>" if spent is not None else f"0 <small>of {budget:g}</small>"
        details.append(f"largest client ε{_delta(local.get('delta'))}")
        tone = "bad" if spent is not None and budget and spent >= budget else ""
    else:
        value, tone = "–", ""
    if client.get("enabled"):
        job_eps = client.get("epsilon")
        shown = f"{job_eps:.2f}" if job_eps is not None else "0"
        if not local.get("enabled"):
            value = shown
            details.append(f"job ε_client{_delta(client.get('delta'))}")
        else:
            details.append(f"job ε_client {shown}")
    return _kpi("privacy (ε)", value, escape(" · ".join(details)), kpi_id="kpi-epsilon", tone=tone)


# -- charts --------------------------------------------------------------------------------


def _legend(items: list[tuple[str, str]]) -> str:
    return "".join(f'<span class="key"><svg width="10" height="10" aria-hidden="true"><rect width="10" '
                   f'height="10" rx="2" fill="{color}"/></svg>{escape(name)}</span>' for name, color in items)


def _panel(panel_id: str, title: str, svg: str, legend: list[tuple[str, str]] | None = None, note: str = "") -> str:
    keys = f'<div class="legend">{_legend(legend)}</div>' if legend else ""
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return (f'<figure class="panel" id="{panel_id}"><figcaption><span>{escape(title)}</span>{keys}</figcaption>'
            f"{svg}{note_html}</figure>")


def _charts(status: dict[str, Any], records: list[dict[str, Any]]) -> str:
    metric = status.get("metric")
    panels = []
    name = METRIC_NAMES.get(metric or "", "validation metric")
    panels.append(_panel("chart-metric", f"{name.capitalize()} per round", line_chart(
        [Series(name, _points(records, metric) if metric else [], COLORS["metric"])],
        label=f"{name} per round", y_label=name.removeprefix("validation "),
        empty="waiting for the first evaluation")))
    panels.append(_panel("chart-loss", "Train loss per round", line_chart(
        [Series("train loss", _points(records, "train_loss"), COLORS["loss"])], label="train loss per round",
        y_label="loss", empty="waiting for the first round")))
    panels.append(_privacy_panel(status, records))
    rounds = [r for r in records if _round(r) > 0]
    categories = [_round(r) for r in rounds]
    panels.append(_panel("chart-bytes", "Bytes moved per round", bar_chart(
        categories, [Layer("down", COLORS["down"], [_num(r.get("bytes_down")) for r in rounds]),
                     Layer("up", COLORS["up"], [_num(r.get("bytes_up")) for r in rounds])],
        label="bytes per round", y_label="MB", stacked=False, value_format=lambda b: fmt(b / 1e6)),
        [("down", COLORS["down"]), ("up", COLORS["up"])]))
    layers = _client_layers(rounds)
    panels.append(_panel("chart-clients", "Clients per round", bar_chart(
        categories, layers, label="clients per round by outcome", y_label="clients", stacked=True),
        [(layer.name, layer.color) for layer in layers if any(layer.values)] or [(layers[0].name, layers[0].color)]))
    layers = _time_layers(rounds)
    panels.append(_panel("chart-time", "Where each round's time went", bar_chart(
        categories, layers, label="seconds per round by phase", y_label="seconds", stacked=True),
        [(layer.name, layer.color) for layer in layers],
        note="train: the slowest client · exchange: the rest of it (downloads, uploads, waiting for late or "
             "silent clients) · other: waiting for clients to enrol, the checkpoint"))
    return f'<section class="charts">{"".join(panels)}</section>'


def _client_layers(rounds: list[dict[str, Any]]) -> list[Layer]:
    """Each sampled client once: completed, dropped (silent, late, errors), rejected (a reply the coordinator
    refused), declined for its ε budget, or replied in a round that failed anyway."""
    completed, dropped, rejected, declined, unused = [], [], [], [], []
    for r in rounds:
        budget = float(len(r.get("budget_exhausted_clients") or []))
        refused = _num(r.get("rejected_clients"))
        done, gone = _num(r.get("completed_clients")), _num(r.get("dropped_clients"))  # gone includes both
        completed.append(done)
        declined.append(budget)
        rejected.append(refused)
        dropped.append(max(gone - budget - refused, 0.0))
        unused.append(max(_num(r.get("sampled_clients")) - done - gone, 0.0))
    return [Layer("completed", COLORS["up"], completed), Layer("dropped", "#f59e0b", dropped),
            Layer("rejected", "#be185d", rejected), Layer("declined (ε budget)", "#dc2626", declined),
            Layer("replied, round failed", "#9ca3af", unused)]


def _time_layers(rounds: list[dict[str, Any]]) -> list[Layer]:
    train, transfer, aggregate, evaluate, other = [], [], [], [], []
    for r in rounds:
        exchange, t = _num(r.get("seconds_exchange")), _num(r.get("seconds_train_max"))
        agg, ev = _num(r.get("seconds_aggregate")), _num(r.get("seconds_eval"))
        train.append(min(t, exchange) if exchange else t)
        transfer.append(max(exchange - t, 0.0))
        aggregate.append(agg)
        evaluate.append(ev)
        other.append(max(_num(r.get("seconds")) - max(exchange, t) - agg - ev, 0.0))
    return [Layer("train", COLORS["train"], train), Layer("exchange", COLORS["transfer"], transfer),
            Layer("aggregate", COLORS["aggregate"], aggregate), Layer("evaluate", COLORS["evaluate"], evaluate),
            Layer("other", COLORS["other"], other)]


def _privacy_panel(status: dict[str, Any], records: list[dict[str, Any]]) -> str:
    eps = status.get("epsilon") or {}
    local, client = eps.get("local") or {}, eps.get("client") or {}
    if local.get("enabled"):
        budget = local.get("budget")
        per_client = sorted(((cid, float(v)) for cid, v in (local.get("clients") or {}).items()),
                            key=lambda item: (-item[1], item[0]))
        shown = per_client[:MAX_EPSILON_BARS]
        names = {c["id"]: c.get("name") or c["id"] for c in status.get("clients") or []}

        def tone(value: float) -> str:
            if budget and value >= budget:
                return "#dc2626"
            return "#d97706" if budget and value >= 0.8 * budget else COLORS["eps_local"]

        svg = hbar_chart([(names.get(cid, cid), v) for cid, v in shown], label="epsilon per client",
                         limit=budget, limit_text=f"budget ε={budget:g}" if budget else "", color=tone,
                         empty="no client has reported ε yet")
        note = []
        if len(per_client) > len(shown):
            note.append(f"the {len(shown)} largest of {len(per_client)} clients")
        if client.get("enabled"):
            job_eps = client.get("epsilon")
            note.append(f"job ε_client = {job_eps:.3f}" if job_eps is not None else "job ε_client: none yet")
        return _panel("chart-epsilon", "Privacy spent: ε per client against its budget", svg,
                      note=" · ".join(note))
    if client.get("enabled"):
        svg = line_chart([Series("ε_client", _points(records, "epsilon_client"), COLORS["eps_client"])],
                         label="job epsilon per round", y_label="ε", zero_based=True,
                         empty="no round has spent ε yet")
        return _panel("chart-epsilon", "Privacy spent: the job's ε_client per round", svg)
    return _panel("chart-epsilon", "Privacy", '<p class="off">Differential privacy is off for this job: '
                  'no ε is spent or tracked.</p>')


# -- client table ----------------------------------------------------------------------------


def _clients(status: dict[str, Any]) -> str:
    clients: list[dict[str, Any]] = status.get("clients") or []
    live = (status.get("clients_summary") or {}).get("online") is not None
    local_dp = bool(((status.get("epsilon") or {}).get("local") or {}).get("enabled"))
    head = ["client", "name", "enrolled", *(["online", "last seen"] if live else []), "sampled", "completed",
            "dropped", "declined (budget)", *(["ε"] if local_dp else []), "last drop"]
    rows = []
    for c in clients[:MAX_CLIENT_ROWS]:
        online = '<span class="pill on">online</span>' if c.get("online") else '<span class="pill off">offline</span>'
        enrolled = _clock(c["enrolled_at"]) if c.get("enrolled_at") else ("yes" if c.get("enrolled") else "no")
        seen = _ago(c.get("last_seen_s"))
        drop = c.get("last_drop")
        drop_text = (f'<span class="muted">round {drop["round"]}:</span> {escape(drop["reason"])}' if drop else "")
        cells = [f'<code>{escape(c["id"])}</code>', escape(c.get("name") or ""), escape(enrolled),
                 *([online, escape(seen)] if live else []), str(c.get("sampled", 0)), str(c.get("completed", 0)),
                 _count(c.get("dropped", 0), "warn"), _count(c.get("declined_budget", 0), "bad")]
        if local_dp:
            cells.append(f"{c['epsilon']:.2f}" if c.get("epsilon") is not None else "–")
        cells.append(drop_text)
        rows.append("<tr>" + "".join(f'<td{_num_class(h)}>{cell}</td>' for h, cell in zip(head, cells, strict=True))
                    + "</tr>")
    more = (f'<p class="note">{len(clients) - MAX_CLIENT_ROWS} more clients in /api/status</p>'
            if len(clients) > MAX_CLIENT_ROWS else "")
    empty = "" if rows else f'<tr><td colspan="{len(head)}" class="muted">no client has enrolled yet</td></tr>'
    th = "".join(f"<th{_num_class(h)}>{escape(h)}</th>" for h in head)
    return (f'<section class="clients" id="clients"><h2>Clients</h2><div class="table"><table><thead><tr>{th}'
            f'</tr></thead><tbody>{"".join(rows)}{empty}</tbody></table></div>{more}</section>')


def _num_class(column: str) -> str:
    return ' class="num"' if column in ("sampled", "completed", "dropped", "declined (budget)", "ε") else ""


def _count(value: int, tone: str) -> str:
    return f'<span class="{tone}">{value}</span>' if value else "0"


def _footer(status: dict[str, Any]) -> str:
    updated = _clock(float(status.get("updated_at") or time.time()), seconds=True)
    if status.get("source") == "report":
        return (f'<footer>as the run ended, {escape(updated)}, from its metrics.jsonl · the live dashboard: '
                "<code>--dashboard-port</code> · fedsite</footer>")
    return (f'<footer>updated <span id="updated">{escape(updated)}</span> · live · the same data as JSON: '
            "<code>/api/status</code> (see docs/dashboard.md) · fedsite</footer>")


# -- small helpers ---------------------------------------------------------------------------


def _delta(delta: Any) -> str:
    return f" (δ={delta:g})" if isinstance(delta, int | float) else ""


def _round(record: dict[str, Any]) -> int:
    value = record.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _points(records: list[dict[str, Any]], key: str | None) -> list[tuple[float, float]]:
    if key is None:
        return []
    return [(float(_round(r)), float(r[key])) for r in records
            if _round(r) >= 0 and isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]


def _mb(size: float) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock(stamp: float, *, seconds: bool = False) -> str:
    return time.strftime("%H:%M:%S" if seconds else "%b %d %H:%M", time.localtime(stamp))


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "not since start"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 5400 else f"{seconds / 3600:.1f} h ago"
