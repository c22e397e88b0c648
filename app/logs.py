"""Logging: one line per event, JSON (or readable text in ``dev``), context on every line,
secrets scrubbed. ``setup(settings)`` is called once by ``serve`` and ``dev``.

Context: ``request_id`` and ``task_id`` live in a context variable, so every line logged
while handling a request, or while a worker checks a task, carries them without passing
them around. The edge layer (``app.gate.EdgeGate``, the one pure-ASGI middleware) opens
the request's context (``open_request``), echoes ``X-Request-ID``, and at the end records
the HTTP metrics and writes the access line (``close_request``: method, route template,
status, duration; never the raw path or query, which may carry tokens).

Redaction is a handler filter: the values of every ``SecretStr`` setting, the client
keys, the database password, and anything shaped like a bearer token, a ``whsec_``
secret or a callback token are replaced before a line is formatted.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.routing import compile_path
from starlette.types import Scope

from app import metrics
from app.settings import Settings

access_log = logging.getLogger("app.access")

# A dict per request or per check. Mutable on purpose: a task spawned inside a request
# (the submit's inline dispatch) copies the context and so shares the same dict.
_fields: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "log_fields", default=None
)


def bind(**fields: str) -> None:
    """Add fields (``task_id=...``) to every later line of the current request or check."""
    current = _fields.get()
    if current is None:
        _fields.set(dict(fields))
    else:
        current.update(fields)


def current() -> dict[str, str]:
    return dict(_fields.get() or {})


def task_context(task_id: str) -> contextvars.Context:
    """A fresh context for a background check of ``task_id`` (``create_task(context=)``)."""
    ctx = contextvars.copy_context()
    ctx.run(_fields.set, {"task_id": task_id})
    return ctx


# ---------------------------------------------------------------- redaction

REDACTED = "[redacted]"
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), rf"\1{REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"), f"whsec_{REDACTED}"),
    # a callback URL's last segment is its token (not the route template's "{token}")
    (re.compile(r"(/callbacks/wiro/[^/\s\"']+/)(?!\{token\})[^/\s\"'?#]+"), rf"\1{REDACTED}"),
    (
        re.compile(r"(?i)(x-api-key|x-signature|x-nonce)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@"), rf"\1{REDACTED}@"),
]


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold, as plain strings worth scrubbing."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    try:
        found.extend(settings.client_keys)
    except ValueError:
        pass
    if settings.database_url:
        password = urlsplit(settings.database_url).password
        if password:
            found.append(password)
    # Short values would scrub ordinary words; the patterns still catch shaped secrets.
    return sorted({v for v in found if len(v) >= 6}, key=len, reverse=True)


# What each of ``_PATTERNS`` needs in a text to match it, lower-cased (the case-blind
# patterns, on ASCII text, match only where the lower-cased text holds their word).
_NEEDS = ("bearer", "whsec_", "/callbacks/wiro/", "x-api-key", "x-signature", "x-nonce", "://")


class Redactor(logging.Filter):
    """Scrubs secrets from the message, the exception text and string extras."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self._secrets = tuple(secrets or ())
        self._known = re.compile("|".join(re.escape(s) for s in secrets)) if secrets else None

    def scrub(self, text: str) -> str:
        # Most texts (ids, routes, statuses) hold no secret and none of the patterns'
        # words: for ASCII text that is decided by substring checks, and such a text is
        # what the substitutions below would leave it, unchanged (~1 us against ~6 us of
        # seven regex passes, for each of a line's strings: docs/benchmarks.md,
        # "forty-eighth round"). Other text (where a case-blind match may go by other
        # letters) takes the substitutions.
        if text.isascii():
            lowered = text.lower()
            if not any(word in lowered for word in _NEEDS) and not any(
                secret in text for secret in self._secrets
            ):
                return text
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        record.exc_info = None  # the scrubbed exc_text is what gets printed
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.scrub(value))
        return True


class ContextFilter(logging.Filter):
    """Puts ``request_id`` and ``task_id`` from the context on the record (an explicit
    ``extra={"task_id": ...}`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_fields.get() or {}).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


# ---------------------------------------------------------------- formatters

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}  # the last: uvicorn's ANSI copy


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class DevFormatter(logging.Formatter):
    """``12:00:01.234 INFO  app.tasks  message  key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname:<5} {record.name}  {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def setup(settings: Settings, *, stream: Any = None) -> logging.Handler:
    """Route every logger (uvicorn's included) through one redacting handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(Redactor(secret_values(settings)))
    handler.setFormatter(DevFormatter() if settings.env == "dev" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request URL at INFO: noise, and the place a secret would leak first.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


# ---------------------------------------------------------------- the request's context

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Scraped or probed every few seconds: their access lines go to DEBUG.
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})
SUBMIT_ROUTE = ("POST", "/v1/tasks")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            rid: str = value.decode("latin-1").strip()
            if _REQUEST_ID.match(rid):
                return rid
            break
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/tasks/{task_id}``), never the raw path:
    bounded label cardinality, and no callback token in metrics or logs."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (413, 503 while draining): match the spec's templates.
    for pattern, template in _templates(scope.get("app")):
        if pattern.match(scope["path"]):
            return template
    return "unmatched"


def _templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    state = getattr(app, "state", None)
    if state is None:
        return []
    found = getattr(state, "route_templates", None)
    if found is None:
        try:
            paths = list(app.openapi().get("paths", {}))
        except Exception:  # no spec, no templates: "unmatched" it is
            paths = []
        found = [(compile_path(p)[0], p) for p in paths]
        state.route_templates = found
    return found


def open_request(scope: Scope) -> tuple[str, contextvars.Token[dict[str, str] | None]]:
    """A request's id (its valid ``X-Request-ID``, else a new one) and its log context,
    opened; ``close_request`` ends it. Called by the edge layer (``app.gate.EdgeGate``)."""
    rid = _request_id(scope)
    return rid, _fields.set({"request_id": rid})


def close_request(
    scope: Scope,
    status: int,
    elapsed: float,
    upstream_s: float,
    token: contextvars.Token[dict[str, str] | None],
) -> None:
    """The request's HTTP metrics and access line, then its log context closed.
    ``upstream_s``: the time it spent waiting for Wiro (``metrics.start_upstream_clock``)."""
    method = scope["method"]
    route = route_template(scope)
    metrics.http_request(method, route, status, elapsed)
    if (method, route) == SUBMIT_ROUTE and status < 300:
        metrics.submit_overhead(elapsed - upstream_s)
    access_log.log(
        logging.DEBUG if route in _QUIET else logging.INFO,
        "%s %s %s",
        method,
        route,
        status,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 1),
        },
    )
    _fields.reset(token)
