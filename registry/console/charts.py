"""Charts of the console as SVG drawn on the server: no script, and no inline style (the
Content Security Policy forbids both), only SVG's presentation attributes. Each chart has a
title for assistive technology; the pages print the same figures in a table beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

INK, MUTED, LINE = "#1a1a1a", "#4a4a4a", "#c8c8c8"


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: int
    colour: str


def bars(title: str, items: Sequence[Bar]) -> Markup:
    """Horizontal bars, one per item, each labelled with its value."""
    row, label_width, width = 26, 230, 300
    most = max([b.value for b in items] + [1])
    height = row * len(items) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{label_width + width + 60}" '
        f'height="{height}" viewBox="0 0 {label_width + width + 60} {height}">'
        f"<title>{escape(title)}</title>"
    ]
    for i, b in enumerate(items):
        y = 4 + i * row
        length = round(width * b.value / most)
        parts.append(
            f'<text x="{label_width - 8}" y="{y + 17}" text-anchor="end" fill="{INK}" '
            f'font-size="14">{escape(b.label)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{max(length, 1)}" height="{row - 8}" '
            f'fill="{b.colour}"/>'
            f'<text x="{label_width + length + 6}" y="{y + 17}" fill="{INK}" '
            f'font-size="14">{b.value}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it went through escape()


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    colour: str
    values: Sequence[int]


def stacked_columns(title: str, ticks: Sequence[str], series: Sequence[Series]) -> Markup:
    """One column per tick, its series stacked; `ticks` label every fourth column."""
    count = len(ticks)
    column, gap, height, left, bottom = 18, 4, 160, 40, 40
    totals = [sum(s.values[i] for s in series) for i in range(count)]
    most = max([*totals, 1])
    width = left + count * (column + gap) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
        f'height="{height + bottom + 10}" viewBox="0 0 {width} {height + bottom + 10}">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{left}" y1="{height + 5}" x2="{width - 5}" y2="{height + 5}" '
        f'stroke="{LINE}"/>'
        f'<text x="{left - 6}" y="14" text-anchor="end" fill="{MUTED}" font-size="12">{most}</text>'
        f'<text x="{left - 6}" y="{height + 5}" text-anchor="end" fill="{MUTED}" '
        f'font-size="12">0</text>'
    ]
    for i in range(count):
        x = left + i * (column + gap)
        top = height + 5
        for s in series:
            size = round((height - 5) * s.values[i] / most)
            if size:
                top -= size
                parts.append(
                    f'<rect x="{x}" y="{top}" width="{column}" height="{size}" fill="{s.colour}"/>'
                )
        if i % 4 == 0:
            parts.append(
                f'<text x="{x}" y="{height + 24}" fill="{MUTED}" font-size="12">'
                f"{escape(ticks[i])}</text>"
            )
    legend_x = left
    for s in series:
        parts.append(
            f'<rect x="{legend_x}" y="{height + bottom - 8}" width="12" height="12" '
            f'fill="{s.colour}"/><text x="{legend_x + 16}" y="{height + bottom + 2}" '
            f'fill="{INK}" font-size="13">{escape(s.label)}</text>'
        )
        legend_x += 30 + 8 * len(s.label)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it went through escape()
