"""The page: escaped, self-contained when static, well-formed SVG that draws what the records hold."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from coordinator.dashboard.render import render_fragment, render_page
from coordinator.dashboard.status import JobInfo, build_status, engine_phase, finished_phase
from coordinator.dashboard.svg import nice_ticks
from coordinator.registry import ClientSeen

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
INFO = JobInfo(name="job <b>", mode="lora", rounds=4, clients_per_round=2, min_clients=1, local_dp=True,
               local_budget=8.0, local_delta=1e-5, client_dp=True, client_delta=1e-5)


def _records() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"round": 0, "val_accuracy": 0.05, "seconds": 2.0}]
    for r in (1, 2, 3):
        rows.append({"round": r, "status": "ok", "sampled_clients": 2, "completed_clients": 2 if r != 2 else 1,
                     "sampled_client_ids": ["c1", "c2"], "completed_client_ids": ["c1", "c2"] if r != 2 else ["c1"],
                     "dropped_clients": 0 if r != 2 else 1, "val_accuracy": 0.05 + 0.1 * r, "train_loss": 3.0 / r,
                     "bytes_down": 2_000_000, "bytes_up": 1_900_000, "seconds": 10.0, "seconds_exchange": 8.0,
                     "seconds_train_max": 6.0, "seconds_aggregate": 0.5, "seconds_eval": 1.0,
                     "epsilon_local": {"c1": float(r)}, "epsilon_local_max": float(r), "epsilon_client": 0.2 * r})
    rows[2]["drop_reasons"] = {"c2": "declined: " + HOSTILE}
    return rows


def _status(final: bool = False) -> dict[str, Any]:
    phase = finished_phase(INFO, _records()) if final else engine_phase(INFO, 4, "train")
    return build_status(INFO, phase, _records(), live_clients=[ClientSeen("c1", HOSTILE, 0.0, 1.0)],
                        source="report" if final else "coordinator")


def test_everything_a_client_can_name_is_escaped() -> None:
    page = render_page(_status(), live=True)
    assert HOSTILE not in page and "<script>alert" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "job &lt;b&gt;" in page


def test_the_static_page_needs_nothing_from_anywhere() -> None:
    page = render_page(_status(final=True), live=False)
    assert "<script" not in page and "<style>" in page
    urls = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert urls == ["data:,"]  # the empty favicon only: no stylesheet, script, font or image to fetch
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_live_page_fetches_only_its_own_assets() -> None:
    page = render_page(_status(), live=True)
    assert sorted(re.findall(r'(?:src|href)="([^"]*)"', page)) == ["data:,", "static/dashboard.css",
                                                                   "static/dashboard.js"]
    assert "<style>" not in page and 'data-poll-ms="2000"' in page
    assert "data-final" not in page and "data-final" in render_fragment(_status(final=True))


def test_charts_are_well_formed_svg_drawing_every_round() -> None:
    fragment = render_fragment(_status())
    svgs = re.findall(r"<svg xmlns=.*?</svg>", fragment, flags=re.S)
    assert len(svgs) == 6
    for svg in svgs:
        ET.fromstring(svg)  # raises on malformed markup
    metric = next(s for s in svgs if 'aria-label="validation accuracy per round"' in s)
    (points,) = re.findall(r'<polyline points="([^"]+)"', metric)
    assert len(points.split()) == 4  # rounds 0..3
    assert re.search(r"<title>validation accuracy, round 3: 0\.35</title>", metric)
    epsilon = next(s for s in svgs if 'aria-label="epsilon per client"' in s)
    assert "budget ε=8" in epsilon and "&lt;script" in epsilon  # the client's name, escaped, labels its bar
    assert 'id="kpi-metric"' in fragment and ">0.3500<" in fragment


def test_the_page_reads_well_with_no_rounds_yet() -> None:
    info = JobInfo(name="fresh", mode="offsite", rounds=5)
    status = build_status(info, engine_phase(info, 1, "waiting for clients", online=0), [], live_clients=[])
    fragment = render_fragment(status)
    assert "round 1 of 5: waiting for clients" in fragment and "no client has enrolled yet" in fragment
    assert "Differential privacy is off" in fragment
    for svg in re.findall(r"<svg xmlns=.*?</svg>", fragment, flags=re.S):
        ET.fromstring(svg)


@given(st.floats(-1e6, 1e6), st.floats(0, 1e6))
def test_ticks_cover_the_range_in_a_few_round_steps(low: float, span: float) -> None:
    ticks = nice_ticks(low, low + span)
    slack = 1e-9 * max(1.0, abs(low), abs(low + span))  # below what an axis can show
    assert ticks[0] <= low + slack and ticks[-1] >= low + span - slack
    assert 2 <= len(ticks) <= 12
    # evenly spaced: compared relative to the step (tiny ranges have tiny steps: 0.5 .. 0.500001 steps by
    # 5e-7), allowing the ticks' rounding to 12 decimals and float resolution at the range's magnitude
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    tolerance = 1e-6 * max(steps) + 2e-12 + 1e-15 * max(1.0, abs(low), abs(low + span))
    assert max(steps) - min(steps) <= tolerance
