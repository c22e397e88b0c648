"""Templates, their filters, and the headers every console page carries."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.responses import HTMLResponse, Response

from app.timestamps import as_utc

HERE = Path(__file__).resolve().parent
STATIC = {  # the only assets: read once, served by the app itself
    "console.css": ((HERE / "static" / "console.css").read_bytes(), "text/css; charset=utf-8"),
    "console.js": ((HERE / "static" / "console.js").read_bytes(), "text/javascript; charset=utf-8"),
}

# Images may come from wherever the task's URLs point (Wiro's CDN, the caller's host);
# everything else only from the gateway (connect-src: the task page's live timeline).
# No inline script or style is needed.
CSP = (
    "default-src 'none'; img-src 'self' https: http: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def secure(response: Response, *, cache: bool = False) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    response.headers.setdefault("Cache-Control", "private, max-age=3600" if cache else "no-store")
    return response


def utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def time_tag(value: datetime | None) -> Markup:
    """``<time>`` in UTC; console.js rewrites the text in the viewer's time zone."""
    v = utc(value)
    if v is None:
        return Markup('<span class="muted">—</span>')
    iso = v.isoformat(timespec="seconds").replace("+00:00", "Z")
    return Markup('<time datetime="{0}" data-local>{1} UTC</time>').format(
        iso, v.strftime("%Y-%m-%d %H:%M:%S")
    )


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    return seconds((utc(end) - utc(start)).total_seconds())  # type: ignore[operator]


def seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def usd(value: Any) -> str:
    if value is None or value == "":
        return "—"
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    return f"${d:.4f}" if abs(d) < 1 else f"${d:,.2f}"


def size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def status_badge(status: str | None) -> Markup:
    if not status:
        return Markup("")
    return Markup('<span class="status status-{0}">{1}</span>').format(
        status, status.replace("_", " ")
    )


env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(
    time=time_tag, duration=duration, seconds=seconds, usd=usd, size=size, status=status_badge
)


def render(name: str, context: dict[str, Any], *, status_code: int = 200) -> Response:
    html = env.get_template(name).render(context)
    return secure(HTMLResponse(html, status_code=status_code))


def error_page(
    status_code: int, title: str, detail: str, *, context: dict[str, Any] | None = None
) -> Response:
    return render(
        "error.html", {**(context or {}), "title": title, "detail": detail}, status_code=status_code
    )


__all__ = ["STATIC", "Markup", "error_page", "escape", "render", "secure", "time_tag"]
