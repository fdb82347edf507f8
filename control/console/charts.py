"""Charts drawn on the server as SVG (no script): a bar per time bucket, and a ranked list as
horizontal bars. Every label is escaped; numbers are formatted for people (``human``)."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

_UNITS = ("", "k", "M", "G", "T", "P")


def human(value: float, unit: str = "") -> str:
    """``1234567`` -> ``1.2M``; with ``unit`` ``"B"``: bytes in powers of 1024."""
    base = 1024.0 if unit == "B" else 1000.0
    n = float(value)
    for prefix in _UNITS:
        if abs(n) < base or prefix == _UNITS[-1]:
            text = f"{n:.0f}" if prefix == "" or abs(n) >= 100 else f"{n:.1f}"
            return f"{text}{prefix}{'i' if unit == 'B' and prefix else ''}{unit}"
        n /= base
    return f"{value}{unit}"  # not reached


def time_bars(title: str, buckets: Sequence[tuple[str, float]], *, unit: str = "", per_second: float = 0,
              width: int = 560, height: int = 160, css: str = "bar") -> Markup:
    """Vertical bars, one per bucket (label, value); the largest value fills the height.
    ``per_second``: the bucket length in seconds, to state the peak as a rate too."""
    top = max((v for _, v in buckets), default=0) or 1
    pad_left, pad_bottom, pad_top = 44, 18, 8
    inner_w, inner_h = width - pad_left - 4, height - pad_bottom - pad_top
    step = inner_w / max(len(buckets), 1)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
             f'<line class="axis" x1="{pad_left}" y1="{pad_top + inner_h}" x2="{width - 4}" y2="{pad_top + inner_h}"/>',
             f'<text class="tick" x="{pad_left - 4}" y="{pad_top + 8}" text-anchor="end">{escape(human(top, unit))}</text>',
             f'<text class="tick" x="{pad_left - 4}" y="{pad_top + inner_h}" text-anchor="end">0</text>']
    for i, (label, value) in enumerate(buckets):
        h = inner_h * value / top
        x = pad_left + i * step + 1
        rate = f" ({human(value / per_second, unit)}/s)" if per_second else ""
        parts.append(f'<rect class="{css}" x="{x:.1f}" y="{pad_top + inner_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{h:.1f}"><title>{escape(label)}: {escape(human(value, unit))}{escape(rate)}</title></rect>')
        if i % 6 == 0:
            parts.append(f'<text class="tick" x="{x:.1f}" y="{height - 4}">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def ranked_bars(title: str, items: Sequence[tuple[str, float]], *, unit: str = "", width: int = 420,
                css: str = "bar") -> Markup:
    """Horizontal bars, one per (label, value), largest first as given."""
    row, label_w = 22, 170
    height = max(len(items), 1) * row + 4
    top = max((v for _, v in items), default=0) or 1
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    if not items:
        parts.append('<text class="tick" x="4" y="16">nothing in this period</text>')
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        w = (width - label_w - 60) * value / top
        shown = label if len(label) <= 24 else label[:23] + "…"
        parts.append(f'<text class="label" x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(shown)}'
                     f'<title>{escape(label)}</title></text>'
                     f'<rect class="{css}" x="{label_w}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row - 6}"/>'
                     f'<text class="tick" x="{label_w + w + 4:.1f}" y="{y + 15}">{escape(human(value, unit))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
