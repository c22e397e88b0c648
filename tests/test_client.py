"""The Python client (clients/python, ``headshot_client``) against a real gateway and
simulator over loopback; ``httpx.MockTransport`` only for what a real gateway cannot be
made to do on cue (a 503, a lost answer, a dropped stream, a held ``Prefer: wait``).

The blocking ``Client`` runs in a worker thread (``asyncio.to_thread``), since the
gateway under test serves from this test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import headshot_client as hc
import httpx
import pytest

from app import clients
from app.migrate import upgrade
from tests.conftest import CLIENT_KEYS, ROOT, Gateway, Sim, run_gateway
from tests.receivers import serve_receiver
from tests.results_helpers import SECRET

INPUT = {"background": "office", "aspectRatio": "1:1", "outputFormat": "png"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database: the client's behaviour does not depend on the database
    (the gateway's own tests cover both)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def gw(sqlite_url: str, sim: Sim, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with run_gateway(db_url=sqlite_url, sim=sim, data_dir=tmp_path) as gateway:
        yield gateway


def inputs(sim: Sim) -> dict[str, str]:
    return {"inputImageUrl": sim.portrait, **INPUT}


class Recorder:
    """Every request a client sent (an httpx event hook)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def sync(self, request: httpx.Request) -> None:
        self.requests.append(request)


@contextlib.asynccontextmanager
async def aclient(
    gw: Gateway,
    *,
    key: str = CLIENT_KEYS["alpha"],
    recorder: Recorder | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> AsyncIterator[hc.AsyncClient]:
    """The client over an httpx client of ours, which we close too (a client given its
    ``http_client`` leaves it to its owner: left open, its sockets leaked)."""
    async with httpx.AsyncClient(
        transport=transport, timeout=30, event_hooks={"request": [recorder] if recorder else []}
    ) as http:
        async with hc.AsyncClient(
            base_url=gw.url, api_key=key, http_client=http, **kwargs
        ) as client:
            yield client


# ---------------------------------------------------------------- against the gateway


async def test_upload_submit_wait_succeeded_sync(gw: Gateway, sim: Sim, tmp_path: Path) -> None:
    """The README's example, blocking client: upload, submit, wait, typed result."""
    photo = tmp_path / "me.jpg"
    photo.write_bytes(httpx.get(sim.portrait, timeout=5).content)

    def run() -> tuple[str, hc.Task, hc.Task]:
        with hc.Client(base_url=gw.url, api_key=CLIENT_KEYS["alpha"]) as client:
            url = client.upload(photo)
            submitted = client.submit(
                input={"inputImageUrl": url, **INPUT}, metadata={"user_id": "u_1"}
            )
            return url, submitted, client.wait(submitted.id, timeout=60)

    url, submitted, done = await asyncio.to_thread(run)
    assert url.startswith(f"{gw.url}/files/") and url.endswith("/input.jpg")
    assert submitted.status in (hc.Status.PENDING, hc.Status.QUEUED, hc.Status.RUNNING)
    assert not submitted.replayed
    assert done.id == submitted.id and done.status == hc.Status.SUCCEEDED and done.done
    assert done.input["inputImageUrl"] == url and done.metadata == {"user_id": "u_1"}
    [out] = done.outputs  # (the gateway's own copy may still be on its way: either URL)
    assert isinstance(out, hc.Output) and out.name.endswith(".png")
    assert out.url.startswith(("http://", "https://"))
    assert done.error is None and done.upstream.task_id
    assert isinstance(done.cost_usd, Decimal)
    assert isinstance(done.created_at, datetime) and done.created_at.tzinfo is not None
    assert done.completed_at is not None and done.completed_at >= done.created_at


async def test_same_key_same_task_replayed(gw: Gateway, sim: Sim) -> None:
    async with aclient(gw) as client:
        key = f"order-{uuid.uuid4()}"
        first = await client.submit(input=inputs(sim), idempotency_key=key)
        again = await client.submit(input=inputs(sim), idempotency_key=key)
        assert again.id == first.id and again.replayed and not first.replayed
        # no key given: the client makes a fresh one per call, so two calls are two tasks
        a = await client.submit(input=inputs(sim))
        b = await client.submit(input=inputs(sim))
        assert len({first.id, a.id, b.id}) == 3 and not a.replayed and not b.replayed
        with pytest.raises(hc.ValidationError) as err:  # same key, another body
            await client.submit(input={**inputs(sim), "background": "studio"}, idempotency_key=key)
        assert err.value.status == 422


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Forwards to the real gateway, but the first POST /v1/tasks's answer is lost on the
    way back (the gateway did create the task), as on a connection reset."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path == "/v1/tasks" and not self.lost:
            await response.aread()
            await response.aclose()
            self.lost.append(request)
            raise httpx.RemoteProtocolError("connection reset", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_submit_retry_after_lost_answer_makes_one_task(gw: Gateway, sim: Sim) -> None:
    """The client's own retry of a submit whose answer was lost gets the same task."""
    transport, rec = LoseFirstAnswer(), Recorder()
    tag = uuid.uuid4().hex
    async with aclient(gw, transport=transport, recorder=rec) as client:
        client._sleep = _no_sleep
        task = await client.submit(input=inputs(sim), metadata={"tag": tag})
        assert task.replayed  # the second attempt was answered from the first's task
        posts = [r for r in rec.requests if r.method == "POST"]
        assert len(posts) == 2 and len(transport.lost) == 1
        keys = {r.headers["idempotency-key"] for r in posts}
        assert len(keys) == 1 and next(iter(keys)).startswith("hgc-")
        assert [t.id async for t in client.list(metadata={"tag": tag})] == [task.id]


async def test_list_every_page_with_filters(gw: Gateway, sim: Sim) -> None:
    tag, other = uuid.uuid4().hex, uuid.uuid4().hex
    rec = Recorder()
    async with aclient(gw, recorder=rec) as client:
        mine = [
            await client.submit(input=inputs(sim), metadata={"batch": tag, "n": str(i)})
            for i in range(5)
        ]
        await client.submit(input=inputs(sim), metadata={"batch": other})
        for t in mine:
            assert (await client.wait(t.id, timeout=60)).status == hc.Status.SUCCEEDED

        rec.requests.clear()
        got = [t async for t in client.list(metadata={"batch": tag}, limit=2)]
        assert [t.id for t in got] == [t.id for t in reversed(mine)]  # newest first
        pages = [r for r in rec.requests if r.url.path == "/v1/tasks"]
        assert len(pages) == 3  # 2 + 2 + 1, following next_cursor
        assert "cursor" not in pages[0].url.params and pages[1].url.params["cursor"]
        assert all(r.url.params["metadata.batch"] == tag for r in pages)

        assert [t.id async for t in client.list(metadata={"batch": tag, "n": "3"})] == [mine[3].id]
        succeeded = [
            t async for t in client.list(status=["succeeded", "failed"], metadata={"batch": tag})
        ]
        assert len(succeeded) == 5
        assert [t async for t in client.list(status="queued", metadata={"batch": tag})] == []
        start = mine[0].created_at - timedelta(minutes=1)
        assert (
            len([t async for t in client.list(created_after=start, metadata={"batch": tag})]) == 5
        )
        assert [t async for t in client.list(created_before=start, metadata={"batch": tag})] == []
        assert (
            len(
                [
                    t
                    async for t in client.list(
                        model="wiro/professional-headshot", metadata={"batch": tag}
                    )
                ]
            )
            == 5
        )
        page = await client.list_page(metadata={"batch": tag}, limit=4)
        assert len(page.data) == 4 and page.next_cursor
        with pytest.raises(ValueError, match="timezone"):
            [t async for t in client.list(created_after=datetime(2026, 1, 1))]


async def test_events_timeline(gw: Gateway, sim: Sim) -> None:
    async with aclient(gw) as client:
        task = await client.submit(input=inputs(sim))
        done = await client.wait(task.id, timeout=60)
        events = await client.events(task.id)
    assert done.status == hc.Status.SUCCEEDED
    assert all(isinstance(e, hc.Event) for e in events)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert events[0].source == "api"
    terminal = [e for e in events if e.terminal]
    assert [e.status for e in terminal] == [hc.Status.SUCCEEDED]
    assert all(e.at.tzinfo is not None for e in events)


async def test_wait_is_held_by_the_gateway_until_terminal(gw: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=0.5, run_s=2.0)
    rec = Recorder()
    async with aclient(gw, recorder=rec) as client:
        task = await client.submit(input=inputs(sim))
        rec.requests.clear()
        done = await client.wait(task.id, timeout=40)
    assert done.status == hc.Status.SUCCEEDED
    # one request, held by the gateway until the task finished
    assert [(r.url.path, r.headers["prefer"]) for r in rec.requests] == [
        (f"/v1/tasks/{task.id}", "wait=40")
    ]


async def test_wait_timeout_returns_the_task_as_it_is(gw: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=30)
    rec = Recorder()
    async with aclient(gw, recorder=rec) as client:
        task = await client.submit(input=inputs(sim))
        rec.requests.clear()
        later = await client.wait(task.id, timeout=1.5)
    assert later.id == task.id and not later.done
    assert [r.headers.get("prefer") for r in rec.requests] == ["wait=2"]


def _events_equal(a: list[hc.Event], b: list[hc.Event]) -> None:
    assert [e.id for e in a] == [e.id for e in b]
    assert a == b


async def test_stream_from_the_gateway(gw: Gateway, sim: Sim) -> None:
    """The blocking client's stream: every event once, in order, ending after the
    terminal one; the same story as the JSON list."""
    sim.configure(queue_s=0.3, run_s=1.0)

    def run() -> tuple[list[hc.Event], list[hc.Event]]:
        with hc.Client(base_url=gw.url, api_key=CLIENT_KEYS["alpha"]) as client:
            task = client.submit(input=inputs(sim))
            streamed = list(client.stream(task.id))
            return streamed, client.events(task.id)

    streamed, listed = await asyncio.to_thread(run)
    _events_equal(streamed, listed)
    assert [e.status for e in streamed if e.terminal] == [hc.Status.SUCCEEDED]
    assert streamed[0].source == "api"


class DropFirstStream(httpx.AsyncBaseTransport):
    """Forwards to the real gateway; the first event stream loses its connection right
    after its first event arrived."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.dropped = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if "text/event-stream" not in request.headers.get("accept", "") or self.dropped:
            return response
        self.dropped += 1
        inner = response.stream
        assert isinstance(inner, httpx.AsyncByteStream)

        class Cut(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner:
                    yield chunk
                    if b"data:" in chunk:
                        await inner.aclose()
                        raise httpx.ReadError("connection lost")

            async def aclose(self) -> None:
                await inner.aclose()

        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=Cut(),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_stream_resumes_after_a_dropped_connection(gw: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=0.3, run_s=1.0)
    transport, rec = DropFirstStream(), Recorder()
    async with aclient(gw, transport=transport, recorder=rec) as client:
        client._sleep = _no_sleep
        task = await client.submit(input=inputs(sim))
        streamed = [e async for e in client.stream(task.id)]
        listed = await client.events(task.id)
    assert transport.dropped == 1
    _events_equal(streamed, listed)  # nothing lost, nothing twice
    streams = [r for r in rec.requests if r.headers.get("accept") == "text/event-stream"]
    assert len(streams) == 2 and "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == str(streamed[0].id)


async def test_cancel_then_conflict(gw: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=30)  # stays queued upstream until cancelled
    async with aclient(gw) as client:
        task = await client.submit(input=inputs(sim))
        cancelling = await client.cancel(task.id)
        assert cancelling.id == task.id
        done = await client.wait(task.id, timeout=30)
        assert done.status == hc.Status.CANCELLED
        with pytest.raises(hc.Conflict) as err:
            await client.cancel(task.id)
    assert err.value.status == 409 and err.value.detail


async def test_errors_are_typed(gw: Gateway, sim: Sim, tmp_path: Path) -> None:
    async with aclient(gw) as client:
        with pytest.raises(hc.NotFound) as nf:
            await client.get("tsk_doesnotexist")
        assert nf.value.status == 404 and nf.value.title and isinstance(nf.value, hc.ApiError)

        with pytest.raises(hc.ValidationError) as bad:
            await client.submit(input={**inputs(sim), "background": "moon", "colour": "red"})
        assert bad.value.status == 422 and bad.value.errors
        locs = [tuple(e["loc"]) for e in bad.value.errors]
        assert any("background" in loc for loc in locs), locs
        assert any("colour" in loc for loc in locs), locs

        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        with pytest.raises(hc.ApiError) as media:
            await client.upload(text)
        assert media.value.status == 415 and isinstance(media.value, hc.UnsupportedMediaType)

    async with aclient(gw, key="key-nobody-0123456789") as stranger:
        with pytest.raises(hc.AuthError) as auth:
            await stranger.get("tsk_doesnotexist")
        assert auth.value.status == 401

    # another client's task is not found
    async with aclient(gw) as alpha, aclient(gw, key=CLIENT_KEYS["beta"]) as beta:
        task = await alpha.submit(input=inputs(sim))
        with pytest.raises(hc.NotFound):
            await beta.get(task.id)


async def test_rate_limit_429_is_retried_after_retry_after(
    sqlite_url: str, sim: Sim, tmp_path: Path
) -> None:
    """A real gateway's per-client rate limit: the client waits out each Retry-After."""
    async with run_gateway(
        db_url=sqlite_url, sim=sim, data_dir=tmp_path, client_rate_burst_s=1.0
    ) as gateway:
        # A rate set for the client counts reads too (the default one only writes).
        await clients.set_limits(gateway.ctx.sm, client="alpha", rate_per_s=2.0, max_in_flight=None)
        retry_afters: list[str] = []
        slept: list[float] = []

        async def seen(response: httpx.Response) -> None:
            if response.status_code == 429:
                retry_afters.append(response.headers["retry-after"])

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            await asyncio.sleep(seconds)

        http = httpx.AsyncClient(timeout=30, event_hooks={"response": [seen]})
        async with hc.AsyncClient(
            base_url=gateway.url, api_key=CLIENT_KEYS["alpha"], http_client=http, max_retries=5
        ) as client:
            client._sleep = sleep
            for _ in range(5):
                with pytest.raises(hc.NotFound):
                    await client.get("tsk_none")
        await http.aclose()
    assert retry_afters, "the limit was never hit"
    assert slept == [float(v) for v in retry_afters]


async def test_verify_webhook_from_the_gateways_notifier(
    sqlite_url: str, sim: Sim, tmp_path: Path
) -> None:
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=sqlite_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=SECRET,
            notify_retry_s="0,0.2",
        ) as gateway,
    ):
        async with aclient(gateway) as client:
            task = await client.submit(input=inputs(sim), webhook_url=f"{rec.url}/hooks")
            [call] = await rec.wait_calls("/hooks", 1, timeout=60)
            event = hc.verify_webhook(call.body, call.headers, SECRET)
            assert client.verify_webhook(call.body, call.headers, SECRET) == event
            assert isinstance(event, hc.WebhookEvent) and event.type == "task.succeeded"
            assert event.data.id == task.id and event.data.status == hc.Status.SUCCEEDED
            assert event.data == await client.get(task.id)

            with pytest.raises(hc.WebhookVerificationError):
                hc.verify_webhook(call.body.replace(b"succeeded", b"failed"), call.headers, SECRET)
            other = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ=="
            with pytest.raises(hc.WebhookVerificationError):
                hc.verify_webhook(call.body, call.headers, other)
            headers = {k: v for k, v in call.headers.items() if k != "webhook-signature"}
            with pytest.raises(hc.WebhookVerificationError):
                hc.verify_webhook(call.body, headers, SECRET)
            mangled = {**call.headers, "webhook-signature": "garbage"}
            with pytest.raises(hc.WebhookVerificationError):
                hc.verify_webhook(call.body, mangled, SECRET)

            # the attempt log, and a redelivery (a new webhook-id)
            [delivery] = await client.deliveries(task.id)
            assert delivery.id == call.headers["webhook-id"] and delivery.reason == "terminal"
            assert delivery.attempts and delivery.attempts[0].status_code == 204
            again = await client.redeliver(task.id)
            assert again.reason == "redeliver" and again.id != delivery.id
            calls = await rec.wait_calls("/hooks", 2, timeout=60)
            second = hc.verify_webhook(calls[1].body, calls[1].headers, SECRET)
            assert calls[1].headers["webhook-id"] == again.id and second.data.id == task.id


def test_verify_webhook_signed_by_standardwebhooks() -> None:
    from standardwebhooks.webhooks import Webhook

    task = json.loads((ROOT / "tests" / "fixtures" / "client_task.json").read_text())
    body = json.dumps({"type": "task.failed", "timestamp": task["updated_at"], "data": task})
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign("msg_1", now, body),
    }
    event = hc.verify_webhook(body.encode(), headers, SECRET)
    assert event.type == "task.failed" and event.data.error == hc.TaskError(
        code="upstream_failed", message="the model failed", upstream_code="1"
    )
    old = now - timedelta(minutes=10)
    stale = {
        **headers,
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(SECRET).sign("msg_1", old, body),
    }
    with pytest.raises(hc.WebhookVerificationError):
        hc.verify_webhook(body, stale, SECRET)
    with pytest.raises(ValueError, match="secret"):
        hc.verify_webhook(body, headers, "")


# ---------------------------------------------------------------- the models and the spec


def _schema_fields(schema: dict[str, Any]) -> dict[str, tuple[bool, bool]]:
    """name -> (required, nullable) for each property of an OpenAPI object schema."""
    out = {}
    for name, prop in schema["properties"].items():
        nullable = any(alt.get("type") == "null" for alt in prop.get("anyOf", []))
        out[name] = (name in schema.get("required", []), nullable)
    return out


def _model_fields(cls: type) -> dict[str, tuple[bool, bool]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("client_only"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name] = (required, type(None) in typing.get_args(hints[f.name]))
    return out


@pytest.mark.parametrize(
    ("schema", "model"),
    [
        ("TaskOut", hc.Task),
        ("TaskOutput", hc.Output),
        ("TaskError", hc.TaskError),
        ("UpstreamRef", hc.Upstream),
        ("EventOut", hc.Event),
        ("TaskPage", hc.Page),
        ("DeliveryOut", hc.Delivery),
        ("DeliveryAttemptOut", hc.DeliveryAttempt),
    ],
)
def test_models_match_openapi(schema: str, model: type) -> None:
    """Every field of the API's schema is known to the client's dataclass and vice versa;
    a required API field has no default in the dataclass (an optional one has one); a
    nullable one is Optional."""
    spec = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    api = _schema_fields(spec["components"]["schemas"][schema])
    mine = _model_fields(model)
    assert set(api) == set(mine), (schema, set(api) ^ set(mine))
    for name, (required, nullable) in api.items():
        if schema == "TaskPage" and name == "next_cursor":
            # Page serves the event list too, whose cursor may be absent
            assert mine[name][1]
            continue
        assert mine[name] == (required, nullable), (schema, name, mine[name], (required, nullable))
    # the event list is a Page too: every field it has, Page knows
    events = spec["components"]["schemas"]["EventList"]["properties"]
    assert set(events) <= {f.name for f in dataclasses.fields(hc.Page)}
    status = spec["components"]["schemas"]["Status"]["enum"]
    assert [s.value for s in hc.Status] == status
    assert hc.TERMINAL == {"succeeded", "failed", "cancelled", "timed_out"}


def test_task_from_api_json() -> None:
    task = hc.Task.from_dict(
        json.loads((ROOT / "tests" / "fixtures" / "client_task.json").read_text())
        | {"new": "field"}
    )
    assert task.status == hc.Status.FAILED and task.done
    assert task.error == hc.TaskError(
        code="upstream_failed", message="the model failed", upstream_code="1"
    )
    assert task.cost_usd == Decimal("0.003510000000") and task.outputs == []
    assert task.created_at == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


# ---------------------------------------------------------------- retries (MockTransport)


def _no_sleep(seconds: float) -> Any:
    async def done() -> None:
        return None

    return done()


def task_json(task_id: str = "tsk_1", status: str = "running") -> dict[str, Any]:
    body = json.loads((ROOT / "tests" / "fixtures" / "client_task.json").read_text())
    return body | {"id": task_id, "status": status, "error": None}


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> tuple[hc.Client, list[float]]:
    slept: list[float] = []
    client = hc.Client(
        base_url="http://gw.test",
        api_key="k",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        **kwargs,
    )
    client._sleep = slept.append
    return client, slept


def problem(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        headers={"content-type": "application/problem+json", **(headers or {})},
        json={"type": "about:blank", "title": "x", "status": status, "detail": "d"},
    )


def scripted(
    *answers: httpx.Response | Exception,
) -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, seen


def test_429_and_503_honour_retry_after() -> None:
    handler, seen = scripted(
        problem(429, {"Retry-After": "2"}),
        problem(503, {"Retry-After": "1"}),
        httpx.Response(200, json=task_json()),
    )
    client, slept = mock_client(handler)
    assert client.get("tsk_1").id == "tsk_1"
    assert slept == [2.0, 1.0] and len(seen) == 3


def test_retry_after_over_the_cap_is_not_waited_out() -> None:
    handler, seen = scripted(problem(429, {"Retry-After": "3600"}))
    client, slept = mock_client(handler, max_retry_after=30)
    with pytest.raises(hc.RateLimited) as err:
        client.get("tsk_1")
    assert err.value.retry_after == 3600 and slept == [] and len(seen) == 1


def test_retries_are_bounded_with_growing_backoff() -> None:
    handler, seen = scripted(*[problem(503) for _ in range(4)])
    client, slept = mock_client(handler, max_retries=3)
    with pytest.raises(hc.ServiceUnavailable) as err:
        client.get("tsk_1")
    assert err.value.status == 503 and isinstance(err.value, hc.ServerError)
    assert len(seen) == 4 and len(slept) == 3
    assert slept[0] < slept[2] and all(s > 0 for s in slept)  # 0.5*2^n with +-50% jitter


def test_what_is_not_safe_to_repeat_is_not_repeated() -> None:
    # redeliver: a 503 or an answer lost mid-request may have made a delivery already
    handler, seen = scripted(problem(503))
    client, slept = mock_client(handler)
    with pytest.raises(hc.ServiceUnavailable):
        client.redeliver("tsk_1")
    handler, seen2 = scripted(httpx.ReadError("reset"))
    client, slept2 = mock_client(handler)
    with pytest.raises(hc.TransportError) as err:
        client.redeliver("tsk_1")
    assert isinstance(err.value.__cause__, httpx.ReadError)
    assert len(seen) == len(seen2) == 1 and slept == slept2 == []
    # ... but a connection that never opened sent nothing: retried for any call
    delivery = {
        "id": "d1",
        "type": "task.succeeded",
        "reason": "redeliver",
        "url": "u",
        "status": "pending",
        "created_at": "2026-11-25T10:00:00Z",
        "next_attempt_at": None,
        "finished_at": None,
        "attempts": [],
    }
    handler, seen3 = scripted(httpx.ConnectError("refused"), httpx.Response(202, json=delivery))
    client, slept3 = mock_client(handler)
    assert client.redeliver("tsk_1").id == "d1" and len(seen3) == 2 and len(slept3) == 1


def test_submit_retries_with_one_key_and_a_problem_without_json() -> None:
    handler, seen = scripted(
        httpx.ReadError("reset"), problem(503), httpx.Response(202, json=task_json())
    )
    client, _ = mock_client(handler)
    task = client.submit(
        input={"inputImageUrl": "https://x/y.jpg"},
        model="m",
        webhook_url="https://h",
        metadata={"a": "b"},
    )
    assert task.id == "tsk_1" and len(seen) == 3
    assert len({r.headers["idempotency-key"] for r in seen}) == 1
    assert json.loads(seen[0].content) == {
        "input": {"inputImageUrl": "https://x/y.jpg"},
        "model": "m",
        "webhook_url": "https://h",
        "metadata": {"a": "b"},
    }
    assert seen[0].headers["authorization"] == "Bearer k"
    # the same key still in flight (409) is waited out on submit, not on other calls
    handler, seen = scripted(
        problem(409), httpx.Response(200, json=task_json(), headers={"Idempotent-Replayed": "true"})
    )
    client, slept = mock_client(handler)
    assert client.submit(input={}, idempotency_key="k1").replayed and len(slept) == 1
    assert [r.headers["idempotency-key"] for r in seen] == ["k1", "k1"]
    handler, seen = scripted(problem(409))
    client, slept = mock_client(handler)
    with pytest.raises(hc.Conflict):
        client.cancel("tsk_1")
    assert len(seen) == 1 and slept == []
    handler, _ = scripted(httpx.Response(502, text="<html>bad gateway</html>"))
    client, _ = mock_client(handler)
    with pytest.raises(hc.ServerError) as err:
        client.get("tsk_1")
    assert err.value.status == 502 and "bad gateway" in err.value.detail


# ---------------------------------------------------------------- wait (MockTransport)


HELD = {"preference-applied": "wait=60"}


def test_wait_holds_in_chunks_of_at_most_60_s() -> None:
    handler, seen = scripted(
        httpx.Response(200, headers=HELD, json=task_json()),
        httpx.Response(200, headers=HELD, json=task_json()),
        httpx.Response(200, headers=HELD, json=task_json(status="succeeded")),
    )
    client, slept = mock_client(handler)
    assert client.wait("tsk_1").status == hc.Status.SUCCEEDED
    assert [r.headers["prefer"] for r in seen] == ["wait=60"] * 3
    assert slept == []  # each answer was held: no pause of its own between them
    assert all(r.url.path == "/v1/tasks/tsk_1" for r in seen)
    handler, seen = scripted(httpx.Response(200, json=task_json(status="failed")))
    client, _ = mock_client(handler)
    assert client.wait("tsk_1", timeout=7.5).status == hc.Status.FAILED
    assert seen[0].headers["prefer"] == "wait=8"
    # the read timeout outlasts the hold
    assert seen[0].extensions["timeout"]["read"] >= 8 + 15


def test_wait_returns_the_task_when_the_timeout_runs_out() -> None:
    handler, seen = scripted(*[httpx.Response(200, json=task_json()) for _ in range(50)])
    client, slept = mock_client(handler)
    # A gateway that did not hold the answer (no Preference-Applied) answers at once: the
    # client then polls, and each pause it takes counts against the timeout.
    client._sleep = lambda s: slept.append(s) or __import__("time").sleep(s)
    task = client.wait("tsk_1", timeout=1.2)
    assert task.status == hc.Status.RUNNING and not task.done
    assert seen[0].headers["prefer"] == "wait=2"
    assert slept and all(0 < x <= 0.5 * 2**i for i, x in enumerate(slept))
    assert sum(slept) <= 1.2 and len(seen) <= 4
    assert "prefer" not in seen[-1].headers  # the time was up: one last plain read


async def test_async_wait_and_list_pages() -> None:
    pages = {
        None: {"data": [task_json("tsk_3"), task_json("tsk_2")], "next_cursor": "c1"},
        "c1": {"data": [task_json("tsk_1")], "next_cursor": None},
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/tasks":
            return httpx.Response(200, json=pages[request.url.params.get("cursor")])
        return httpx.Response(200, json=task_json(status="succeeded"))

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with hc.AsyncClient(base_url="http://gw.test/", api_key="k", http_client=http) as client:
        ids = [
            t.id async for t in client.list(status=["failed", "cancelled"], limit=2, client="beta")
        ]
        assert ids == ["tsk_3", "tsk_2", "tsk_1"]
        assert seen[0].url.params.get_list("status") == ["failed", "cancelled"]
        assert seen[0].url.params["client"] == "beta" and seen[1].url.params["cursor"] == "c1"
        assert (await client.wait("tsk_1", timeout=30)).done
        assert seen[-1].headers["prefer"] == "wait=30"
    await http.aclose()


# ---------------------------------------------------------------- stream (MockTransport)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"id: {e['id']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def ev(i: int, status: str | None = None, source: str = "poll") -> dict[str, Any]:
    return {
        "id": i,
        "at": f"2026-11-25T10:00:0{i}Z",
        "source": source,
        "status": status,
        "upstream_status": None,
        "message": None,
    }


class Dropping(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends ``chunks`` and then loses the connection (or ends cleanly)."""

    def __init__(self, *chunks: bytes, drop: bool = True) -> None:
        self.chunks, self.drop = chunks, drop

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.drop:
            raise httpx.ReadError("connection lost")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c
        if self.drop:
            raise httpx.ReadError("connection lost")


STREAM = {"content-type": "text/event-stream"}


def stream_script() -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    return scripted(
        # heartbeat comments, an event split across chunks, then the connection drops
        httpx.Response(
            200,
            headers=STREAM,
            stream=Dropping(
                b"retry: 3000\n\n: hello\n\n",
                sse(ev(1, "pending", "api"))[:20],
                sse(ev(1, "pending", "api"))[20:],
                b": keep-alive\n\n",
                sse(ev(2, "queued", "dispatcher")),
            ),
        ),
        problem(503),  # the reconnection is refused once (retried like any read)
        httpx.Response(
            200,
            headers=STREAM,
            stream=Dropping(
                sse(ev(3, "running"), ev(4, "succeeded"), ev(5, None, "delivery")), drop=False
            ),
        ),
    )


def test_stream_resumes_with_last_event_id_and_ends_after_terminal() -> None:
    handler, seen = stream_script()
    client, slept = mock_client(handler)
    events = list(client.stream("tsk_1"))
    assert [(e.id, e.status) for e in events] == [
        (1, "pending"),
        (2, "queued"),
        (3, "running"),
        (4, "succeeded"),
        (5, None),
    ]
    assert events[3].terminal and isinstance(events[0], hc.Event)
    assert [r.headers["accept"] for r in seen] == ["text/event-stream"] * 3
    assert "last-event-id" not in seen[0].headers
    assert seen[1].headers["last-event-id"] == seen[2].headers["last-event-id"] == "2"
    # the stream's own retry: before reconnecting, then a backoff for the 503
    assert len(slept) == 2 and slept[0] == 3.0 and slept[1] < 3.0


async def test_async_stream_resumes_and_ends() -> None:
    handler, seen = stream_script()
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with hc.AsyncClient(base_url="http://gw.test", api_key="k", http_client=http) as client:
        client._sleep = _no_sleep
        ids = [e.id async for e in client.stream("tsk_1")]
    await http.aclose()
    assert ids == [1, 2, 3, 4, 5] and seen[2].headers["last-event-id"] == "2"


def test_stream_closed_early_on_a_finished_task_catches_up_from_the_list() -> None:
    handler, seen = scripted(
        httpx.Response(
            200, headers=STREAM, stream=Dropping(sse(ev(1, "pending", "api")), drop=False)
        ),
        httpx.Response(200, json=task_json(status="cancelled")),
        httpx.Response(200, json={"data": [ev(1, "pending", "api"), ev(2, "cancelled", "cancel")]}),
    )
    client, _ = mock_client(handler)
    assert [e.id for e in client.stream("tsk_1")] == [1, 2]
    assert [r.url.path for r in seen] == [
        "/v1/tasks/tsk_1/events",
        "/v1/tasks/tsk_1",
        "/v1/tasks/tsk_1/events",
    ]


def test_stream_gives_up_after_max_retries_and_refuses_json() -> None:
    handler, seen = scripted(*[httpx.ReadError("down") for _ in range(3)])
    client, _ = mock_client(handler, max_retries=0)
    with pytest.raises(hc.StreamError):
        list(client.stream("tsk_1"))
    assert len(seen) == 1
    handler, _ = scripted(httpx.Response(200, json={"data": []}))
    client, _ = mock_client(handler)
    with pytest.raises(hc.StreamError, match="event stream"):
        list(client.stream("tsk_1"))
    handler, _ = scripted(problem(404))
    client, _ = mock_client(handler)
    with pytest.raises(hc.NotFound):
        list(client.stream("tsk_1"))
