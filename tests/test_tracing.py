"""Traces (app/tracing.py): the spans of a task from the request to its notification,
the caller's ``traceparent`` carried into the webhook, no secret in any attribute, and
nothing at all when tracing is off. Spans are read from the SDK's in-memory exporter,
against the simulator over loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from sqlalchemy import select

from app import tracing
from app.models import Task
from tests import signals
from tests.conftest import CLIENT_KEYS, SIM_KEY, SIM_SECRET, Sim, run_gateway, task_body
from tests.receivers import serve_receiver
from tests.results_helpers import SECRET, until

HOOK = "/hooks/traced"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _exporter() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


async def _traced_task(db_url: str, sim: Sim, tmp_path: Path, headers: dict[str, str]):
    """Submit one task with a webhook under tracing; (task id, webhook call, exporter,
    the task row) once its notification span has ended."""
    provider, exporter = _exporter()
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=SECRET,
            notify_retry_s="0,0.2",
            tracer_provider=provider,
        ) as gw,
    ):
        assert tracing.provider() is provider
        body = task_body(sim) | {"webhook_url": f"{rec.url}{HOOK}"}
        r = await gw.client().post("/v1/tasks", json=body, headers=headers)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        [call] = await rec.wait_calls(HOOK, 1)

        async def notified() -> bool:
            # the notification's span, and that of Wiro's callback (sent at completion)
            return bool(_named(exporter, "notification")) and bool(
                _named(exporter, "POST /callbacks/wiro/{task_id}/{token}")
            )

        await until(notified)
        async with gw.ctx.sm() as s:
            row = (await s.scalars(select(Task).where(Task.id == task_id))).one()
    assert tracing.provider() is None  # given back when the app stopped
    return task_id, call, exporter, row


async def test_a_task_leaves_request_upstream_and_notification_spans(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    task_id, call, exporter, row = await _traced_task(db_url, sim, tmp_path, {})

    [server] = [s for s in _named(exporter, "POST /v1/tasks")]
    assert server.kind == SpanKind.SERVER
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/tasks"
    assert server.attributes["http.response.status_code"] == 202
    assert server.attributes[tracing.TASK_ID] == task_id
    assert server.parent is None  # no traceparent came in: a new trace

    [run] = _named(exporter, "wiro Run")
    assert run.kind == SpanKind.CLIENT and run.attributes is not None
    assert run.attributes[tracing.TASK_ID] == task_id
    assert run.attributes[tracing.WIRO_TASK_ID] == row.upstream_task_id
    assert _trace_id(run) == _trace_id(server)  # the inline Run is part of the request
    details = _named(exporter, "wiro Detail")
    assert details, [s.name for s in exporter.get_finished_spans()]
    for d in details:
        assert d.kind == SpanKind.CLIENT and d.attributes is not None
        assert d.attributes[tracing.TASK_ID] == task_id
        assert d.attributes[tracing.WIRO_TASK_ID] == row.upstream_task_id

    [note] = _named(exporter, "notification")
    assert note.kind == SpanKind.CLIENT and note.attributes is not None
    assert note.attributes[tracing.TASK_ID] == task_id
    assert note.attributes["hgw.delivery.attempt"] == 1
    assert note.attributes["hgw.delivery_id"] == call.headers["webhook-id"]
    assert note.attributes["http.response.status_code"] == 204
    # The notification continues the request's trace, and the receiver gets its context.
    assert row.traceparent is not None and row.traceparent.split("-")[1] == _trace_id(server)
    assert _trace_id(note) == _trace_id(server)
    version, trace_id, parent_id, flags = call.headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", _trace_id(note), _span_id(note))
    assert int(flags, 16) & 1  # sampled

    # No secret in any attribute: keys, signing secrets, the socket token, callback URLs.
    secrets = [SIM_KEY, SIM_SECRET, SECRET, *CLIENT_KEYS.values()]
    if row.upstream_token:
        secrets.append(row.upstream_token)
    spans = exporter.get_finished_spans()
    assert len(spans) >= 4
    [callback] = _named(exporter, "POST /callbacks/wiro/{task_id}/{token}")
    assert callback.attributes is not None and callback.attributes[tracing.TASK_ID] == task_id
    for span in spans:
        for key, value in (span.attributes or {}).items():
            text = str(value)
            assert not any(secret in text for secret in secrets), (span.name, key)
            # a callback's URL carries its token: only the route template may show
            assert not re.search(r"/callbacks/wiro/[^/]+/(?!\{token\})", text), (span.name, key)
            assert not any(
                word in key.lower()
                for word in ("authorization", "api_key", "api-key", "signature", "token", "nonce")
            )


async def test_the_callers_traceparent_reaches_its_webhook(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    incoming = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    _, call, exporter, row = await _traced_task(db_url, sim, tmp_path, {"traceparent": incoming})
    [server] = _named(exporter, "POST /v1/tasks")
    assert _trace_id(server) == CALLER_TRACE
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert row.traceparent is not None
    assert row.traceparent.split("-")[1:3] == [CALLER_TRACE, _span_id(server)]
    [note] = _named(exporter, "notification")
    assert note.parent is not None and format(note.parent.span_id, "016x") == _span_id(server)
    version, trace_id, parent_id, _flags = call.headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", CALLER_TRACE, _span_id(note))


async def test_tracing_off_records_nothing(
    db_url: str, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url, sim=sim, data_dir=tmp_path, webhook_secret=SECRET, notify_retry_s="0,0.2"
        ) as gw,
    ):
        assert tracing.provider() is None and not tracing.active()
        # Not the process-wide provider either: nothing of the SDK was installed.
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        body = task_body(sim) | {"webhook_url": f"{rec.url}{HOOK}"}
        r = await gw.client().post(
            "/v1/tasks", json=body, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        assert r.status_code == 202, r.text
        [call] = await rec.wait_calls(HOOK, 1)
        async with gw.ctx.sm() as s:
            row = (await s.scalars(select(Task).where(Task.id == r.json()["id"]))).one()
    assert row.traceparent is None
    assert "traceparent" not in call.headers


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "gw"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ],
)
def test_the_rule_that_turns_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by(env) is on
    provider = tracing.provider_from_env(env | {"OTEL_TRACES_EXPORTER": "console"} if on else env)
    assert (provider is not None) is on
    if provider is not None:
        assert provider.resource.attributes["service.name"] == tracing.SERVICE_NAME
        provider.shutdown()


def test_the_service_name_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gw")
    provider = tracing.provider_from_env(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "edge-gw"}
    )
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "edge-gw"
    provider.shutdown()


def _requests_to(route: str) -> float:
    return sum(
        REGISTRY.get_sample_value(
            "gateway_http_requests_total", {"method": "POST", "route": route, "status": status}
        )
        or 0.0
        for status in ("202", "204")
    )


async def test_a_process_wide_provider_gets_nothing_of_the_gateway(
    db_url: str, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the gateway's own provider traces it. A process-wide one (what
    ``opentelemetry-instrument`` or FastAPI's own OTLP auto-configuration installs) gets
    no span of FastAPI's native telemetry either, whose server span would carry the
    request's path: a callback's token."""
    provider, exporter = _exporter()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # as set_tracer_provider does
    assert trace.get_tracer_provider() is provider
    callbacks = "/callbacks/wiro/{task_id}/{token}"
    before = _requests_to(callbacks)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        r = await gw.client().post("/v1/tasks", json=task_body(sim))
        assert r.status_code == 202, r.text
        # Wiro's callback has been answered: its request is over, span and all.
        await signals.until(
            lambda: _requests_to(callbacks) > before, timeout=20, what="Wiro's callback answered"
        )
    assert exporter.get_finished_spans() == ()
