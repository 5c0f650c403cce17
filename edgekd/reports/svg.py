"""Small SVG plots for the HTML report: inline, self-contained, no JavaScript, no plotting library.

Three kinds are enough for a release report: a scatter (accuracy against latency, with p50..p90 whiskers),
horizontal bars (sizes, stage times) and horizontal box plots (latency distributions). Scales are linear or
logarithmic (chosen automatically when values span more than an order of magnitude).
"""

from __future__ import annotations

import math
from html import escape
from typing import Callable, Sequence

TEACHER_COLOR = "#d62728"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
BUDGET_COLOR = "#b45309"
GRID, AXIS, TEXT, MUTED = "#e5e7eb", "#6b7280", "#111827", "#6b7280"
FONT = "font-family=\"DejaVu Sans, Liberation Sans, Arial, sans-serif\""

WIDTH = 560
LEFT_LABELS = 170  # room for artifact / stage names left of a bar or box plot


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def num(v: float) -> str:
    """A tick label: up to 4 significant digits, no exponent for ordinary values."""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-4:
        return f"{v:.0e}"
    return f"{v:.4g}"


class Scale:
    """Maps data values in [lo, hi] to pixels in [a, b]; logarithmic when `log`."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False):
        if log:
            lo, hi = max(lo, 1e-12), max(hi, 1e-12)
        if hi <= lo:  # a single value: an axis around it
            pad = abs(lo) * 0.1 or 1.0
            lo, hi = (lo / 2, lo * 2) if log else (lo - pad, hi + pad)
        self.lo, self.hi, self.a, self.b, self.log = lo, hi, a, b, log

    @classmethod
    def fit(cls, values: Sequence[float], a: float, b: float, log: bool | None = None, pad: float = 0.08,
            zero: bool = False, bounds: tuple[float | None, float | None] = (None, None)) -> "Scale":
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return cls(0.0, 1.0, a, b)
        lo, hi = min(vals), max(vals)
        if log is None:
            log = lo > 0 and hi / lo > 20
        if log:
            f = (hi / lo) ** pad if hi > lo else 2.0
            lo, hi = lo / f, hi * f
        else:
            span = (hi - lo) or abs(hi) or 1.0
            lo, hi = (0.0 if zero else lo - span * pad), hi + span * pad
        if bounds[0] is not None:
            lo = max(lo, bounds[0])
        if bounds[1] is not None:
            hi = min(hi, bounds[1])
        return cls(lo, hi, a, b, log)

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(max(v, 1e-12)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        t = min(max(t, -0.02), 1.02)  # a value past the axis is drawn at its edge
        return self.a + t * (self.b - self.a)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            out = []
            for e in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
                for m in ((1,) if math.log10(self.hi / self.lo) > 2.5 else (1, 2, 5)):
                    v = m * 10.0 ** e
                    if self.lo <= v <= self.hi:
                        out.append(v)
            return out or [self.lo, self.hi]
        raw = (self.hi - self.lo) / n
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step - 1e-9) * step
        return [round(first + i * step, 12) for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def _open(width: int, height: int, title: str, kind: str) -> list[str]:
    return [f'<svg class="plot" data-plot="{kind}" role="img" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" {FONT} font-size="12">',
            f"<title>{escape(title)}</title>",
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
            f'<text x="12" y="20" font-size="14" font-weight="bold" fill="{TEXT}">{escape(title)}</text>']


def _x_axis(sx: Scale, y0: float, y1: float, label: str, fmt: Callable[[float], str]) -> list[str]:
    out = []
    for t in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{x:.1f}" y="{y1 + 15:.1f}" text-anchor="middle" fill="{MUTED}">{escape(fmt(t))}</text>')
    out.append(f'<line x1="{sx.a:.1f}" y1="{y1:.1f}" x2="{sx.b:.1f}" y2="{y1:.1f}" stroke="{AXIS}"/>')
    scale_note = " (log scale)" if sx.log else ""
    out.append(f'<text x="{(sx.a + sx.b) / 2:.1f}" y="{y1 + 32:.1f}" text-anchor="middle" fill="{TEXT}">'
               f"{escape(label + scale_note)}</text>")
    return out


def _ref_lines(lines, sx: Scale | None, sy: Scale | None, area: tuple[float, float, float, float]) -> list[str]:
    """Dashed budget lines: (axis "x"|"y", value, label)."""
    x0, y0, x1, y1 = area
    out = []
    for axis, value, label in lines:
        if axis == "x" and sx is not None:
            x = sx(value)
            # the label sits just above the plot area, on the side of the line with room for it
            right = x + 4 + 7 * len(label) < x1 + 16
            out += [f'<line x1="{x:.1f}" y1="{y0 - 2:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="{BUDGET_COLOR}" '
                    f'stroke-width="2" stroke-dasharray="6 4" shape-rendering="crispEdges"/>',
                    f'<text x="{x + 4 if right else x - 4:.1f}" y="{y0 - 4:.1f}" '
                    f'text-anchor="{"start" if right else "end"}" fill="{BUDGET_COLOR}">{escape(label)}</text>']
        elif axis == "y" and sy is not None:
            y = sy(value)
            out += [f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{BUDGET_COLOR}" '
                    f'stroke-width="2" stroke-dasharray="6 4" shape-rendering="crispEdges"/>',
                    f'<text x="{x1 - 4:.1f}" y="{y - 5:.1f}" text-anchor="end" fill="{BUDGET_COLOR}">'
                    f"{escape(label)}</text>"]
    return out


def _marker(shape: str, x: float, y: float, color: str, r: float = 6) -> str:
    if shape == "diamond":
        return (f'<path d="M{x:.1f},{y - r - 1:.1f} L{x + r + 1:.1f},{y:.1f} L{x:.1f},{y + r + 1:.1f} '
                f'L{x - r - 1:.1f},{y:.1f} Z" fill="{color}" stroke="#ffffff" stroke-width="1"/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}" stroke="#ffffff" stroke-width="1"/>'


def scatter(points: list[dict], *, title: str, x_label: str, y_label: str,
            x_fmt: Callable[[float], str] = num, y_fmt: Callable[[float], str] = num,
            y_bounds: tuple[float | None, float | None] = (None, None), ref_lines=()) -> str:
    """points: {label, x, y, color, shape ("circle" | "diamond"), x_range (lo, hi) drawn as a whisker}."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    legend_rows = math.ceil(len(points) / 2)
    width, plot_h = WIDTH, 250
    x0, x1, y0 = 64, width - 20, 46
    y1 = y0 + plot_h
    height = int(y1 + 48 + 18 * legend_rows)
    xs = [v for p in pts for v in (p["x"], *(p.get("x_range") or ()))]
    xs += [v for axis, v, _ in ref_lines if axis == "x"]
    sx = Scale.fit(xs, x0, x1)
    sy = Scale.fit([p["y"] for p in pts] + [v for axis, v, _ in ref_lines if axis == "y"], y1, y0, log=False,
                   bounds=y_bounds)
    out = _open(width, height, title, "scatter")
    for t in sy.ticks():
        y = sy(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">{escape(y_fmt(t))}</text>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="{AXIS}"/>')
    out.append(f'<text transform="translate(14 {(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'fill="{TEXT}">{escape(y_label)}</text>')
    out += _x_axis(sx, y0, y1, x_label, x_fmt)
    out += _ref_lines(ref_lines, sx, sy, (x0, y0, x1, y1))
    for p in pts:
        x, y = sx(p["x"]), sy(p["y"])
        if p.get("x_range"):
            lo, hi = (sx(v) for v in p["x_range"])
            out.append(f'<line x1="{lo:.1f}" y1="{y:.1f}" x2="{hi:.1f}" y2="{y:.1f}" stroke="{p["color"]}" '
                       f'stroke-width="2" opacity="0.6"/>')
        out.append(_marker(p.get("shape", "circle"), x, y, p["color"]))
    for i, p in enumerate(points):
        lx, ly = 24 + (i % 2) * (width // 2), y1 + 52 + 18 * (i // 2)
        out.append(_marker(p.get("shape", "circle"), lx, ly - 4, p["color"], r=5))
        text = p["label"] + ("" if p in pts else " (not measured)")
        out.append(f'<text x="{lx + 12}" y="{ly}" fill="{TEXT}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(rows: list[dict], *, title: str, x_label: str, fmt: Callable[[float], str] = num,
         ref_lines=(), log: bool | None = False) -> str:
    """Horizontal bars. rows: {label, value (None: no bar), color, text (shown right of the bar)}."""
    width, row_h = WIDTH, 26
    x0, x1, y0 = LEFT_LABELS, WIDTH - 90, 46
    y1 = y0 + max(len(rows), 1) * row_h
    height = int(y1 + 44)
    values = [r["value"] for r in rows if r.get("value") is not None]
    sx = Scale.fit(values + [v for axis, v, _ in ref_lines if axis == "x"], x0, x1, log=log, zero=not log, pad=0.04)
    out = _open(width, height, title, "bars")
    out += _x_axis(sx, y0, y1, x_label, fmt)
    for i, r in enumerate(rows):
        y = y0 + i * row_h
        out.append(f'<text x="{x0 - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" fill="{TEXT}">'
                   f"{escape(r['label'])}</text>")
        end = x0
        if r.get("value") is not None and r["value"] > 0:
            end = sx(r["value"])
            out.append(f'<rect x="{x0}" y="{y + 4}" width="{max(end - x0, 1.5):.1f}" height="{row_h - 8}" '
                       f'fill="{r["color"]}" rx="2"/>')
        out.append(f'<text x="{end + 6:.1f}" y="{y + row_h / 2 + 4:.1f}" fill="{MUTED}">'
                   f"{escape(r.get('text') or '')}</text>")
    out += _ref_lines(ref_lines, sx, None, (x0, y0, x1, y1))
    out.append("</svg>")
    return "\n".join(out)


def boxes(rows: list[dict], *, title: str, x_label: str, fmt: Callable[[float], str] = num) -> str:
    """Horizontal box plots from quantiles. rows: {label, color, q: {percentile: value}} with at least the
    percentiles 0, 1, 25, 50, 75, 99, 100; whiskers p1..p99, box p25..p75, a bar at the median, dots at min/max."""
    width, row_h = WIDTH, 30
    x0, x1, y0 = LEFT_LABELS, WIDTH - 20, 40
    y1 = y0 + max(len(rows), 1) * row_h
    height = int(y1 + 62)
    sx = Scale.fit([v for r in rows for v in r["q"].values()], x0, x1)
    out = _open(width, height, title, "boxes")
    out += _x_axis(sx, y0, y1, x_label, fmt)
    for i, r in enumerate(rows):
        q, c = r["q"], r["color"]
        ym = y0 + i * row_h + row_h / 2
        out.append(f'<text x="{x0 - 8}" y="{ym + 4:.1f}" text-anchor="end" fill="{TEXT}">{escape(r["label"])}</text>')
        out.append(f'<line x1="{sx(q[1]):.1f}" y1="{ym:.1f}" x2="{sx(q[99]):.1f}" y2="{ym:.1f}" stroke="{c}" '
                   f'stroke-width="2"/>')
        for p in (1, 99):
            out.append(f'<line x1="{sx(q[p]):.1f}" y1="{ym - 6:.1f}" x2="{sx(q[p]):.1f}" y2="{ym + 6:.1f}" '
                       f'stroke="{c}" stroke-width="2"/>')
        out.append(f'<rect x="{sx(q[25]):.1f}" y="{ym - 9:.1f}" width="{max(sx(q[75]) - sx(q[25]), 2):.1f}" '
                   f'height="18" fill="{c}" fill-opacity="0.35" stroke="{c}" stroke-width="1.5"/>')
        out.append(f'<line x1="{sx(q[50]):.1f}" y1="{ym - 9:.1f}" x2="{sx(q[50]):.1f}" y2="{ym + 9:.1f}" '
                   f'stroke="{c}" stroke-width="3"/>')
        for p in (0, 100):
            out.append(f'<circle cx="{sx(q[p]):.1f}" cy="{ym:.1f}" r="2.5" fill="{c}"/>')
    out.append(f'<text x="{x0}" y="{y1 + 52}" fill="{MUTED}">box p25–p75 · bar median · whiskers p1–p99 · '
               f"dots min, max</text>")
    out.append("</svg>")
    return "\n".join(out)
