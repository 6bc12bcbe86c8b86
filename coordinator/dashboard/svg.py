"""Charts as SVG strings, drawn on the server: lines per round, bars per round, bars per client.

Small on purpose (axes, ticks, gridlines, a tooltip per point through SVG
``<title>``); every text is escaped, since names and reasons can come from
clients. Colours are presentation attributes, not ``style``, so the live page
can forbid inline styles in its Content-Security-Policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
AXIS = "#6b7280"
GRID = "#e5e7eb"
TEXT = "#374151"
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 12, 34


@dataclass
class Series:
    """One line of a chart, named for its legend and tooltips; ``dashed`` sets it apart from the others."""
    name: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


@dataclass
class Layer:
    """One band of a stacked bar chart, one value per round (bytes down or up, clients completed or dropped...)."""
    name: str
    color: str
    values: list[float]


def fmt(value: float) -> str:
    """Compact numbers for axes and tooltips: 0.612, 12.3, 4.5k, 1.2M."""
    if not math.isfinite(value):
        return "–"
    size = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= limit:
            return f"{value / limit:.3g}{suffix}"
    if size == 0 or size >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    scale = max(abs(low), abs(high))
    if high - low <= max(scale * 1e-9, 1e-300):  # flat, below float resolution or subnormal: a band around it
        pad = scale * 0.1 if scale * 0.1 > 1e-300 else 1.0  # a subnormal step would underflow to 0 below
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    steps = math.ceil((high - start) / step - 1e-9)
    return [round(start + i * step, 12) for i in range(max(steps, 1) + 1)]


def _frame(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(label)}" font-family="{FONT}" font-size="11" class="chart">'
            + "".join(body) + "</svg>")


def _empty(width: int, height: int, label: str, text: str) -> str:
    return _frame(width, height, label, [
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" rx="6" fill="#f9fafb" stroke="{GRID}"/>',
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="{AXIS}">{escape(text)}</text>'])


def _round_ticks(low: int, high: int) -> list[int]:
    span = max(high - low, 1)
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000, 10**9) if span / s <= 10)
    return list(range(low - low % step, high + 1, step))


class _Axes:
    """Maps data to pixels inside the margins, and draws the y grid with its labels."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_ticks: list[float]) -> None:
        self.width, self.height = width, height
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.y_ticks = y_ticks

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (value - self.x0) / span * (self.width - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - BOTTOM - (value - self.y0) / span * (self.height - TOP - BOTTOM)

    def grid(self, y_label: str, value_format: Callable[[float], str]) -> list[str]:
        out = []
        for tick in self.y_ticks:
            y = self.y(tick)
            out.append(f'<line x1="{LEFT}" x2="{self.width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 3.5:.1f}" text-anchor="end" fill="{AXIS}">'
                       f'{escape(value_format(tick))}</text>')
        mid = (TOP + self.height - BOTTOM) / 2
        out.append(f'<text x="12" y="{mid:.1f}" text-anchor="middle" fill="{TEXT}" '
                   f'transform="rotate(-90 12 {mid:.1f})">{escape(y_label)}</text>')
        base = self.height - BOTTOM
        out.append(f'<line x1="{LEFT}" x2="{self.width - RIGHT}" y1="{base}" y2="{base}" stroke="{AXIS}"/>')
        return out

    def x_labels(self, ticks: Sequence[int], x_label: str) -> list[str]:
        base = self.height - BOTTOM
        out = [f'<text x="{self.x(t):.1f}" y="{base + 14}" text-anchor="middle" fill="{AXIS}">{t}</text>'
               for t in ticks]
        out.append(f'<text x="{(LEFT + self.width - RIGHT) / 2:.1f}" y="{self.height - 4}" text-anchor="middle" '
                   f'fill="{TEXT}">{escape(x_label)}</text>')
        return out


def _y_ticks(values: list[float], *, zero_based: bool, refs: Sequence[float] = ()) -> list[float]:
    values = [v for v in [*values, *refs] if math.isfinite(v)]
    low, high = min(values), max(values)
    if zero_based:
        low = min(0.0, low)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    bottom = low if zero_based and low == 0 else low - pad
    if low >= 0 > bottom:  # amounts and accuracies never go below zero: neither does the axis
        bottom = 0.0
    return nice_ticks(bottom, high + pad)


def line_chart(series: list[Series], *, label: str, y_label: str, x_label: str = "round", width: int = 480,
               height: int = 220, zero_based: bool = False, refs: Sequence[tuple[float, str, str]] = (),
               value_format: Callable[[float], str] = fmt, empty: str = "no rounds yet") -> str:
    """One polyline per series; ``refs`` are horizontal reference lines (value, text, colour)."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return _empty(width, height, label, empty)
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    low, high = int(min(xs)), int(max(xs))
    if high == low:
        high = low + 1
    axes = _Axes(width, height, (low, high), _y_ticks(ys, zero_based=zero_based, refs=[r[0] for r in refs]))
    body = axes.grid(y_label, value_format) + axes.x_labels(_round_ticks(low, high), x_label)
    for value, text, color in refs:
        y = axes.y(value)
        body.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                    f'stroke-dasharray="5 4" stroke-width="1.5"/>')
        body.append(f'<text x="{width - RIGHT - 4}" y="{y - 4:.1f}" text-anchor="end" fill="{color}">'
                    f'{escape(text)}</text>')
    radius = 3.2 if max(len(s.points) for s in drawn) <= 40 else 0
    for s in drawn:
        path = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in s.points)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        body.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="2.2" '
                    f'stroke-linejoin="round"{dash}/>')
        dot = f'r="{radius}"' if radius else 'r="6" fill-opacity="0"'  # many points: invisible hover targets
        for x, y in s.points:
            tip = f"{s.name}, {x_label} {x:g}: {value_format(y)}"
            body.append(f'<circle cx="{axes.x(x):.1f}" cy="{axes.y(y):.1f}" {dot} fill="{s.color}">'
                        f"<title>{escape(tip)}</title></circle>")
    return _frame(width, height, label, body)


def bar_chart(categories: list[int], layers: list[Layer], *, label: str, y_label: str, x_label: str = "round",
              stacked: bool = True, width: int = 480, height: int = 220,
              value_format: Callable[[float], str] = fmt, empty: str = "no rounds yet") -> str:
    """Bars per category (round): the layers stacked, or side by side."""
    if not categories or not layers:
        return _empty(width, height, label, empty)
    totals = [sum(max(layer.values[i], 0.0) for layer in layers) for i in range(len(categories))] if stacked \
        else [max(layer.values[i] for layer in layers) for i in range(len(categories))]
    axes = _Axes(width, height, (0, len(categories)), _y_ticks([*totals, 0.0], zero_based=True))
    slot = (width - LEFT - RIGHT) / len(categories)
    bar = min(slot * 0.72, 46.0)
    body = axes.grid(y_label, value_format)
    step = max(1, math.ceil(len(categories) / 12))
    base = height - BOTTOM
    for i, category in enumerate(categories):
        left = LEFT + i * slot + (slot - bar) / 2
        if i % step == 0 or i == len(categories) - 1:
            body.append(f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{base + 14}" text-anchor="middle" '
                        f'fill="{AXIS}">{category}</text>')
        bottom = 0.0
        for k, layer in enumerate(layers):
            value = max(layer.values[i], 0.0)
            if stacked:
                y_top, y_bottom, x, w = axes.y(bottom + value), axes.y(bottom), left, bar
                bottom += value
            else:
                w = bar / len(layers)
                y_top, y_bottom, x = axes.y(value), axes.y(0.0), left + k * w
            if y_bottom - y_top < 0.05:
                continue
            tip = f"{x_label} {category}, {layer.name}: {value_format(layer.values[i])}"
            body.append(f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{max(w - 1, 1):.1f}" '
                        f'height="{y_bottom - y_top:.1f}" fill="{layer.color}"><title>{escape(tip)}</title></rect>')
    body.append(f'<text x="{(LEFT + width - RIGHT) / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                f'fill="{TEXT}">{escape(x_label)}</text>')
    return _frame(width, height, label, body)


def hbar_chart(rows: list[tuple[str, float]], *, label: str, limit: float | None = None, limit_text: str = "",
               width: int = 480, value_format: Callable[[float], str] = fmt, empty: str = "nothing yet",
               color: Callable[[float], str] = lambda _v: "#0d9488") -> str:
    """One horizontal bar per row (a client's ε), against a vertical limit line (its budget)."""
    if not rows:
        return _empty(width, 120, label, empty)
    row_h, top, bottom, left = max(20, min(34, 160 // len(rows))), 8, 30, 118
    height = top + bottom + row_h * len(rows)
    high = max([v for _, v in rows] + ([limit] if limit is not None else []))
    ticks = nice_ticks(0.0, high * 1.05 or 1.0)
    span = ticks[-1] or 1.0

    def x(value: float) -> float:
        return left + value / span * (width - left - RIGHT)

    body = []
    for tick in ticks:
        body.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{height - bottom}" '
                    f'stroke="{GRID}"/>')
        body.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 14}" text-anchor="middle" fill="{AXIS}">'
                    f'{escape(value_format(tick))}</text>')
    for i, (name, value) in enumerate(rows):
        y = top + i * row_h
        shown = name if len(name) <= 18 else name[:17] + "…"
        body.append(f'<text x="{left - 6}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" fill="{TEXT}">'
                    f'{escape(shown)}</text>')
        body.append(f'<rect x="{left}" y="{y + 4}" width="{max(x(value) - left, 1):.1f}" height="{row_h - 8}" '
                    f'rx="2" fill="{color(value)}"><title>{escape(f"{name}: {value_format(value)}")}</title></rect>')
    if limit is not None:
        lx = x(limit)
        body.append(f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="{top - 4}" y2="{height - bottom}" stroke="#dc2626" '
                    f'stroke-width="1.5" stroke-dasharray="5 4"/>')
        body.append(f'<text x="{lx - 4:.1f}" y="{height - 4}" text-anchor="end" fill="#dc2626">'
                    f'{escape(limit_text)}</text>')
    return _frame(width, height, label, body)
