"""Dependency-free SVG line charts: round ticks, a legend, shaded bands, gaps where a value is missing.

`line_chart` returns an `<svg>` element to inline in HTML; `save_chart` writes it as a standalone file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
LEFT, TOP, BOTTOM, GAP = 64, 34, 46, 14   # margins around the plot area (GAP: before the legend), in pixels
LEGEND_LINE = 18                          # height of one legend entry
CHAR_WIDTH = 7.4                          # width of a wide 12px sans-serif character (legend room)
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@dataclass
class Series:
    """One line through (xs[i], ys[i]); a None or NaN value breaks it. `lows`/`highs` shade a band around it."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    lows: Sequence[float | None] | None = None
    highs: Sequence[float | None] | None = None
    color: str | None = None   # default: the palette, in order of the series
    dashed: bool = False

    def __post_init__(self):
        if len(self.xs) != len(self.ys):
            raise ValueError(f"series {self.name!r}: {len(self.xs)} xs but {len(self.ys)} ys")
        if (self.lows is None) != (self.highs is None):
            raise ValueError(f"series {self.name!r}: give both lows and highs for a band, or neither")
        for band in (self.lows, self.highs):
            if band is not None and len(band) != len(self.xs):
                raise ValueError(f"series {self.name!r}: a band needs one low and one high per x")

    def points(self) -> list[tuple[float, float] | None]:
        """(x, y) per index, None where either is missing."""
        return [(float(x), float(y)) if _finite(x) and _finite(y) else None
                for x, y in zip(self.xs, self.ys, strict=True)]

    def band(self) -> list[tuple[float, float, float] | None]:
        if self.lows is None:
            return []
        return [(float(x), float(lo), float(hi)) if _finite(x) and _finite(lo) and _finite(hi) else None
                for x, lo, hi in zip(self.xs, self.lows, self.highs, strict=True)]


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _stretches(items: list) -> list[list]:
    """Maximal runs of consecutive non-None items."""
    stretches, current = [], []
    for item in items:
        if item is None:
            if current:
                stretches.append(current)
            current = []
        else:
            current.append(item)
    return stretches + [current] if current else stretches


# ----- ticks -----
def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) that cover [low, high] in about `count` steps;
    `integer` keeps the step at 1 or more."""
    if not (_finite(low) and _finite(high)) or low > high:
        raise ValueError(f"nice_ticks needs finite low <= high, got {low}, {high}")
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    step = max(_nice_step((high - low) / count), 1 if integer else 0)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    digits = max(0, 1 - math.floor(math.log10(step)))
    return [round(i * step, digits) + 0.0 for i in range(first, last + 1)]


def _nice_step(raw: float) -> float:
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def tick_label(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or step < 1e-4:
        return f"{value:.3g}"
    return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


# ----- geometry -----
@dataclass
class _Frame:
    """The plot area in pixels and the data range it shows."""

    left: float
    top: float
    width: float
    height: float
    xs: list[float]   # x ticks; the first and last bound the range
    ys: list[float]

    def x(self, value: float) -> float:
        return round(self.left + (value - self.xs[0]) / (self.xs[-1] - self.xs[0]) * self.width, 2)

    def y(self, value: float) -> float:
        return round(self.top + (self.ys[-1] - value) / (self.ys[-1] - self.ys[0]) * self.height, 2)


def _frame(series: list[Series], width: int, height: int, legend_width: float) -> _Frame:
    xs, ys = [], []
    for s in series:
        for x, y in filter(None, s.points()):
            xs.append(x)
            ys.append(y)
        for x, low, high in filter(None, s.band()):
            xs.append(x)
            ys += [low, high]
    if not xs:
        raise ValueError("line_chart: no finite point in any series")
    return _Frame(LEFT, TOP, width - LEFT - GAP - legend_width, height - TOP - BOTTOM,
                  nice_ticks(min(xs), max(xs), integer=all(x.is_integer() for x in xs)), nice_ticks(min(ys), max(ys)))


def _legend_width(series: list[Series], width: int) -> float:
    longest = max(len(s.name) for s in series)
    return min(36 + CHAR_WIDTH * longest, width * 0.4)


# ----- drawing -----
def _axes(frame: _Frame, x_label: str, y_label: str) -> list[str]:
    right, bottom = frame.left + frame.width, frame.top + frame.height
    out = []
    x_step, y_step = frame.xs[1] - frame.xs[0], frame.ys[1] - frame.ys[0]
    for tick in frame.xs:
        x = frame.x(tick)
        out.append(f'<line x1="{x}" y1="{frame.top}" x2="{x}" y2="{bottom}" stroke="#e6e6e6"/>')
        out.append(f'<text class="tick" x="{x}" y="{bottom + 16}" text-anchor="middle">'
                   f'{tick_label(tick, x_step)}</text>')
    for tick in frame.ys:
        y = frame.y(tick)
        out.append(f'<line x1="{frame.left}" y1="{y}" x2="{right}" y2="{y}" stroke="#e6e6e6"/>')
        out.append(f'<text class="tick" x="{frame.left - 6}" y="{y + 4}" text-anchor="end">'
                   f'{tick_label(tick, y_step)}</text>')
    out.append(f'<rect class="frame" x="{frame.left}" y="{frame.top}" width="{frame.width}" '
               f'height="{frame.height}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{frame.left + frame.width / 2}" y="{bottom + 36}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {frame.top + frame.height / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    return out


def _series(series: Series, color: str, frame: _Frame) -> str:
    segments = _stretches(series.points())
    lines = [seg for seg in segments if len(seg) > 1]
    path = "".join("M" + "L".join(f"{frame.x(x)} {frame.y(y)}" for x, y in seg) for seg in lines)
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [_band(series, color, frame)]
    if path:
        parts.append(f'<path class="line" d="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
    parts += [f'<circle class="marker" cx="{frame.x(x)}" cy="{frame.y(y)}" r="3.5" fill="{color}"/>'
              for seg in segments if len(seg) == 1 for x, y in seg]
    count = sum(len(seg) for seg in segments)
    return (f'<g class="series" data-name="{escape(series.name)}" data-points="{count}">'
            f'<title>{escape(series.name)}</title>{"".join(parts)}</g>')


def _band(series: Series, color: str, frame: _Frame) -> str:
    """One closed outline per run of points with a band: along the highs, then back along the lows."""
    outlines = []
    for seg in _stretches(series.band()):
        edge = [(x, hi) for x, _, hi in seg] + [(x, lo) for x, lo, _ in reversed(seg)]
        outlines.append("M" + "L".join(f"{frame.x(x)} {frame.y(y)}" for x, y in edge) + "Z")
    if not outlines:
        return ""
    return f'<path class="band" d="{"".join(outlines)}" fill="{color}" fill-opacity="0.18" stroke="none"/>'


def _legend(series: list[Series], colors: list[str], x: float, max_chars: int) -> list[str]:
    out = []
    for i, (s, color) in enumerate(zip(series, colors, strict=True)):
        y = TOP + 8 + LEGEND_LINE * i
        name = s.name if len(s.name) <= max_chars else s.name[:max_chars - 1] + "\u2026"
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(f'<g class="legend-entry"><line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" '
                   f'stroke-width="2"{dash}/><text x="{x + 28}" y="{y + 4}">{escape(name)}</text></g>')
    return out


def line_chart(series: list[Series], title: str, x_label: str, y_label: str, width: int = 640,
               height: int = 320) -> str:
    """An `<svg class="chart">` with one `<g class="series">` per series (its line a `<path class="line">`,
    lone points `<circle class="marker">`, its band a `<path class="band">`), axes, ticks and a legend.
    The chart grows taller than `height` where the legend needs it."""
    if not series:
        raise ValueError(f"line_chart {title!r}: no series to plot")
    height = max(height, TOP + LEGEND_LINE * len(series) + 8)
    legend_width = _legend_width(series, width)
    frame = _frame(series, width, height, legend_width)
    colors = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    body = _axes(frame, x_label, y_label)
    body += [_series(s, color, frame) for s, color in zip(series, colors, strict=True)]
    legend_x = frame.left + frame.width + GAP
    body += _legend(series, colors, legend_x, int((legend_width - 36) / CHAR_WIDTH))
    body.append(f'<text class="title" x="{frame.left + frame.width / 2}" y="20" text-anchor="middle" '
                f'font-size="14" font-weight="bold">{escape(title)}</text>')
    return (f'<svg class="chart" data-title="{escape(title)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" font-family="sans-serif" font-size="12" fill="#222">'
            f'<title>{escape(title)}</title><rect width="{width}" height="{height}" fill="#fff"/>'
            + "".join(body) + "</svg>")


def save_chart(path: str | Path, svg: str) -> Path:
    """Write a chart as a standalone .svg file (with the SVG namespace that a file outside HTML needs)."""
    path = Path(path)
    path.write_text(svg.replace("<svg ", f'<svg xmlns="{SVG_NAMESPACE}" ', 1) + "\n")
    return path
