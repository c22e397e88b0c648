"""Charts drawn on the server as inline SVG: no script, no external asset.

Each chart is an ``<svg role="img">`` with a ``<title>`` and a ``<desc>`` naming every
value, so a screen reader gets the numbers; the page also shows them in a table. Colours
come from CSS classes (the console's stylesheet), never inline styles, so the console's
Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

from markupsafe import Markup

Fmt = Callable[[float], str]


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _svg(chart_id: str, title: str, desc: str, width: int, height: int, body: list[str]) -> Markup:
    # Every interpolated string above and below went through escape().
    return Markup(  # noqa: S704
        f'<svg class="chart" id="{escape(chart_id)}" role="img" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="xMinYMin meet" aria-labelledby="{escape(chart_id)}-t '
        f'{escape(chart_id)}-d" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{escape(chart_id)}-t">{escape(title)}</title>'
        f'<desc id="{escape(chart_id)}-d">{escape(desc)}</desc>' + "".join(body) + "</svg>"
    )


def bars(
    rows: Sequence[tuple[str, float]],
    *,
    chart_id: str,
    title: str,
    fmt: Fmt = _num,
    classes: Sequence[str] | None = None,
) -> Markup:
    """Horizontal bars, one row per label: readable at any width."""
    width, label_w, value_w, row_h = 600, 150, 90, 30
    height = max(1, len(rows)) * row_h + 10
    top = max((v for _, v in rows), default=0.0) or 1.0
    span = width - label_w - value_w
    body = []
    for i, (label, value) in enumerate(rows):
        y = 5 + i * row_h
        w = 0.0 if value <= 0 else max(2.0, span * value / top)
        cls = f"bar {classes[i]}" if classes else "bar"
        body.append(
            f'<text x="{label_w - 8}" y="{y + 19}" text-anchor="end" class="label">'
            f"{escape(label)}</text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
            f'class="{escape(cls)}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 19}" class="value">'
            f"{escape(fmt(value))}</text>"
        )
    if not rows:
        body.append(
            f'<text x="{width / 2}" y="20" text-anchor="middle" class="label">no data</text>'
        )
    desc = "; ".join(f"{label}: {fmt(v)}" for label, v in rows) or "no data"
    return _svg(chart_id, title, desc, width, height, body)


def columns(
    rows: Sequence[tuple[str, float]], *, chart_id: str, title: str, fmt: Fmt = _num
) -> Markup:
    """Vertical columns over time (e.g. one per day), with the top value marked."""
    width, height, left, bottom, top_pad = 600, 220, 60, 40, 20
    n = max(1, len(rows))
    top = max((v for _, v in rows), default=0.0) or 1.0
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    slot = plot_w / n
    every = max(1, -(-n // 8))  # at most ~8 axis labels
    body = [
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" y2="{top_pad + plot_h}" '
        f'class="axis"/>',
        f'<text x="{left - 6}" y="{top_pad + 4}" text-anchor="end" class="label">'
        f"{escape(fmt(top))}</text>",
        f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end" class="label">'
        f"{escape(fmt(0))}</text>",
    ]
    for i, (label, value) in enumerate(rows):
        h = 0.0 if value <= 0 else max(1.0, plot_h * value / top)
        x = left + i * slot + slot * 0.15
        body.append(
            f'<rect x="{x:.1f}" y="{top_pad + plot_h - h:.1f}" '
            f'width="{slot * 0.7:.1f}" height="{h:.1f}" class="bar">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>"
        )
        if i % every == 0:
            body.append(
                f'<text x="{left + i * slot + slot / 2:.1f}" y="{height - 18}" '
                f'text-anchor="middle" class="label">{escape(label)}</text>'
            )
    if not rows:
        body.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            'class="label">no data</text>'
        )
    desc = "; ".join(f"{label}: {fmt(v)}" for label, v in rows) or "no data"
    return _svg(chart_id, title, desc, width, height, body)
