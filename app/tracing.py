"""Traces (OpenTelemetry): off unless the standard ``OTEL_*`` variables ask for them.

The rule (``enabled_by``): ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is
set; otherwise it is on when ``OTEL_TRACES_EXPORTER`` is set to anything but ``none``, or
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set.
Exporters: ``otlp`` (the default; OTLP over HTTP/protobuf, configured by the SDK's own
``OTEL_EXPORTER_OTLP_*`` variables) and ``console``. ``OTEL_SERVICE_NAME`` defaults to
``headshot-gateway``; ``OTEL_TRACES_SAMPLER`` and the rest are read by the SDK.

Off, nothing of the SDK is imported or created: every hook below tests one module
global and returns. On, the gateway uses its own ``TracerProvider`` (not the process-wide
global one) and makes:

- a SERVER span per HTTP request (``server_span``, opened by ``app.gate.EdgeGate``),
  named ``METHOD /route/{template}``, continuing the caller's W3C ``traceparent``;
- a CLIENT span per call to Wiro (``wiro_call``), named ``wiro Run``, ``wiro Detail``...;
- a CLIENT span per notification attempt (``notification``), a child of the trace
  context stored with the task when it was created (``new_task``), injected into the
  webhook POST as its ``traceparent`` header.

All carry the gateway's task id as ``hgw.task_id`` where it is known. Attributes are
chosen, never copied from requests: no URL path or query (callback tokens), no headers
(API keys, signatures), no Wiro socket token, no exception message.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi.telemetry import TelemetryConfig
from starlette.types import Scope

from app import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

# FastAPI's own OpenTelemetry (``FastAPI(telemetry=...)``, since FastAPI 0.142), off: it
# traces through the process-wide providers, which the gateway never installs, but which
# ``opentelemetry-instrument`` or FastAPI's OTLP auto-configuration would (the latter on
# ``OTEL_EXPORTER_OTLP_ENDPOINT``, the variable that turns our tracing on, in 0.142's
# default; on ``FASTAPI_OTEL_AUTO_CONFIGURE=true`` since). Its server span carries
# ``url.path``: a callback's token. Off, it also costs a request nothing (its check for a
# configured provider, three provider lookups: ~6 µs a request, before any middleware).
NO_NATIVE_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "auto_configure": False,
}

TASK_ID = "hgw.task_id"
WIRO_TASK_ID = "hgw.wiro_task_id"
SERVICE_NAME = "headshot-gateway"

# None: tracing is off, and every hook is a no-op.
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
# The task a piece of work is about, when the log context does not know it yet (a
# submit's inline Run starts before the request binds the new task's id).
_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_task", default=None)
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()


# ---------------------------------------------------------------- configuration


def enabled_by(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables in ``env`` turn tracing on (see the module doc)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return any(
        env.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A provider exporting as ``env`` says, or None when tracing is off."""
    env = os.environ if env is None else env
    if not enabled_by(env):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": SERVICE_NAME})
    )
    kinds = [k.strip().lower() for k in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for kind in kinds or ["otlp"]:
        if kind == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif kind == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif kind and kind != "none":
            log.warning("OTEL_TRACES_EXPORTER %r is not supported (otlp, console): ignored", kind)
    return provider


def install(provider: TracerProvider) -> None:
    """Trace with ``provider`` from now on (the app's lifespan calls this)."""
    global _tracer, _provider
    _provider, _tracer = provider, provider.get_tracer("app")


def uninstall(provider: TracerProvider) -> None:
    """Back to the no-op path, if ``provider`` is still the one in use."""
    global _tracer, _provider
    if _provider is provider:
        _provider = _tracer = None


def provider() -> TracerProvider | None:
    return _provider


def active() -> bool:
    return _tracer is not None


# ---------------------------------------------------------------- helpers


def _current_task_id() -> str | None:
    return _task.get() or logs.current().get("task_id")


def _traceparent(span: Span) -> str | None:
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier.get("traceparent")


def _context_from(traceparent: str | None, tracestate: str | None = None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


# ---------------------------------------------------------------- the hooks


def new_task(task_id: str) -> str | None:
    """A new task is being created in the current request: its id goes on the request's
    span and on the spans of the work that follows here (the inline Run); the answer is
    the trace context to store with the task (None when tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    _task.set(task_id)
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    span.set_attribute(TASK_ID, task_id)
    return _traceparent(span)


@contextlib.contextmanager
def _server_span(scope: Scope) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    headers = {k: v for k, v in scope.get("headers", []) if k in (b"traceparent", b"tracestate")}
    parent = _context_from(
        headers.get(b"traceparent", b"").decode("latin-1"),
        headers.get(b"tracestate", b"").decode("latin-1"),
    )
    method = scope["method"]
    with _tracer.start_as_current_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
        attributes={"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
    ) as span:
        yield span


def server_span(scope: Scope) -> contextlib.AbstractContextManager[Span | None]:
    """The SERVER span of one HTTP request (``app.gate.EdgeGate`` opens it), continuing the
    caller's ``traceparent``; a shared no-op context manager when tracing is off. Its end
    (``server_span_done``) comes while the request's log context is still open, so the
    task id bound by the routes is there."""
    if _tracer is None:
        return _NULL
    return _server_span(scope)


def server_span_failed(span: Span | None, exc: BaseException) -> None:
    if span is not None:
        span.set_attribute("error.type", type(exc).__name__)


def server_span_done(span: Span | None, scope: Scope, status: int) -> None:
    """Name (``METHOD /route/{template}``), route, status and task id on the span."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    route = logs.route_template(scope)
    span.update_name(f"{scope['method']} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    task_id = logs.current().get("task_id")
    if task_id:
        span.set_attribute(TASK_ID, task_id)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def _wiro_span(endpoint: str, wiro_task_id: str | None) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    assert _tracer is not None
    attributes: dict[str, str] = {"http.request.method": "POST", "hgw.wiro.endpoint": endpoint}
    task_id = _current_task_id()
    if task_id:
        attributes[TASK_ID] = task_id
    if wiro_task_id:
        attributes[WIRO_TASK_ID] = wiro_task_id
    name = "wiro " + endpoint.rsplit("/", 1)[-1]
    with _tracer.start_as_current_span(
        name,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as e:
            # The type only: a message could quote what the upstream sent back.
            span.set_attribute("error.type", type(e).__name__)
            status = getattr(e, "http_status", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise


def wiro_call(
    endpoint: str, wiro_task_id: str | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A CLIENT span around one call to Wiro's ``endpoint`` (``Run``, ``Task/Detail``...);
    a shared no-op context manager when tracing is off."""
    if _tracer is None:
        return _NULL
    return _wiro_span(endpoint, wiro_task_id)


def set_wiro_task_id(span: Span | None, wiro_task_id: str | None) -> None:
    if span is not None and wiro_task_id:
        span.set_attribute(WIRO_TASK_ID, wiro_task_id)


@contextlib.contextmanager
def _notification_span(
    task_id: str, traceparent: str | None, *, delivery_id: str, attempt: int, host: str
) -> Iterator[tuple[Span, str | None]]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    parent = _context_from(traceparent) if traceparent else None
    with _tracer.start_as_current_span(
        "notification",
        context=parent,
        kind=SpanKind.CLIENT,
        record_exception=False,
        attributes={
            TASK_ID: task_id,
            "hgw.delivery_id": delivery_id,
            "hgw.delivery.attempt": attempt,
            "http.request.method": "POST",
            "server.address": host,
        },
    ) as span:
        yield span, _traceparent(span)


def notification(
    task_id: str, traceparent: str | None, *, delivery_id: str, attempt: int, host: str
) -> contextlib.AbstractContextManager[tuple[Span, str | None] | None]:
    """A CLIENT span around one notification attempt, a child of the task's stored trace
    context; yields ``(span, traceparent to send)`` (None when tracing is off)."""
    if _tracer is None:
        return _NULL
    return _notification_span(
        task_id, traceparent, delivery_id=delivery_id, attempt=attempt, host=host
    )


def notification_result(
    span: Span | None, *, status_code: int | None, error: str | None, delivered: bool
) -> None:
    """The attempt's outcome on its span (the error kind, not the receiver's text)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if status_code is not None:
        span.set_attribute("http.response.status_code", status_code)
    span.set_attribute("hgw.delivery.delivered", delivered)
    if not delivered:
        span.set_status(Status(StatusCode.ERROR))
        if status_code is None and error:
            span.set_attribute(
                "error.type", "transport" if not error.startswith("refused") else "refused"
            )
