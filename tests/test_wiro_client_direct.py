"""``WiroHTTP``: WiroClient hands its requests to the transport directly
(``app.http_pool.send_direct``). Everything observable must be what a plain
``httpx.AsyncClient`` gives: the request on the wire, every answer's outcome (the error
tree), transport failures, cookies, and the closed client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.http_pool import PoolTransport
from app.wiro import WiroClient, WiroError, WiroStateError, WiroUnavailable
from app.wiro.client import LIMITS, WiroHTTP
from app.wiro.signing import NonceSource
from tests.conftest import SIM_KEY, SIM_SECRET, Sim
from tests.procs import free_port
from tests.test_wiro_client import (
    BASE,
    FIXTURES,
    KEY,
    NON_RUN_CALLS,
    SECRET,
    TASK_ID,
    call_for_fixture,
    fixture,
    run,
)

Respond = Callable[[httpx.Request], httpx.Response]


class Both:
    """The same answers to a WiroClient over a plain ``httpx.AsyncClient`` (what the
    app used before ``WiroHTTP``) and one over ``WiroHTTP``; their requests recorded."""

    def __init__(self) -> None:
        self.respond: Respond = lambda r: httpx.Response(599)
        self.seen: dict[str, list[httpx.Request]] = {"plain": [], "direct": []}
        self.http = {
            "plain": httpx.AsyncClient(
                transport=httpx.MockTransport(self._handler("plain")),
                follow_redirects=False,
                limits=LIMITS,
            ),
            "direct": WiroHTTP(httpx.MockTransport(self._handler("direct"))),
        }
        # The same clock for both, so that nonces and signatures are equal too.
        self.clients = {
            name: WiroClient(
                base_url=BASE,
                api_key=KEY,
                api_secret=SECRET,
                http=http,
                nonce_source=NonceSource(clock=lambda: 1_700_000_000.0),
            )
            for name, http in self.http.items()
        }

    def _handler(self, name: str) -> Respond:
        def handle(request: httpx.Request) -> httpx.Response:
            self.seen[name].append(request)
            return self.respond(request)

        return handle

    async def outcomes(self, call: Callable[[WiroClient], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, client in self.clients.items():
            try:
                out[name] = ("ok", await call(client))
            except WiroError as e:
                out[name] = ("error", type(e), vars(e), str(e))
        return out

    async def aclose(self) -> None:
        for http in self.http.values():
            await http.aclose()


def wire(request: httpx.Request) -> tuple[Any, ...]:
    """What goes on the wire, a multipart body's random boundary made constant."""
    raw, content = request.headers.raw, request.content
    _, _, boundary = request.headers.get("content-type", "").partition("boundary=")
    if boundary:
        raw = [(k, v.replace(boundary.encode(), b"B")) for k, v in raw]
        content = content.replace(boundary.encode(), b"B")
    return (request.method, str(request.url), raw, content)


@pytest.fixture
async def both() -> Any:
    b = Both()
    yield b
    await b.aclose()


def test_wiro_http_is_direct_without_an_environment_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    http = WiroHTTP()
    assert isinstance(http.direct, PoolTransport)
    assert http.follow_redirects is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    proxied = WiroHTTP()
    # The client routes by URL (the proxy) as a plain client would: no direct path.
    assert proxied.direct is None
    client = WiroClient(base_url=BASE, api_key=KEY, api_secret=SECRET, http=proxied)
    assert client._direct is None


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
async def test_every_recorded_answer_ends_the_same(both: Both, name: str) -> None:
    body = fixture(name)
    for status in (200, 400, 500):
        both.respond = lambda r, s=status: httpx.Response(s, json=body)
        out = await both.outcomes(call_for_fixture(name))
        assert out["plain"] == out["direct"], (name, status)
    assert [wire(r) for r in both.seen["plain"]] == [wire(r) for r in both.seen["direct"]]


@pytest.mark.parametrize("call", [*sorted(NON_RUN_CALLS), "run"])
@pytest.mark.parametrize(
    "answer",
    [
        lambda r: httpx.Response(200, text="<html>not json</html>"),
        lambda r: httpx.Response(429, headers={"retry-after": "7"}, json={"result": False}),
        lambda r: httpx.Response(524, text="a timeout"),
        lambda r: httpx.Response(502, json={"taskid": "9"}),
        lambda r: httpx.Response(401, json={}),
        lambda r: httpx.Response(
            200,
            headers={"content-encoding": "gzip"},
            content=__import__("gzip").compress(json.dumps({"result": True}).encode()),
        ),
    ],
)
async def test_odd_answers_end_the_same(both: Both, call: str, answer: Respond) -> None:
    both.respond = answer
    out = await both.outcomes(run if call == "run" else NON_RUN_CALLS[call])
    assert out["plain"] == out["direct"]


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError],
)
async def test_transport_failures_end_the_same(
    both: Both, exc_type: type[httpx.TransportError]
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated transport failure", request=request)

    both.respond = fail
    for call in (run, NON_RUN_CALLS["detail"]):
        out = await both.outcomes(call)
        assert out["plain"] == out["direct"]
        assert out["direct"][0] == "error"


async def test_cookies_are_kept_and_sent_back_the_same(both: Both) -> None:
    """A cookie Wiro's edge sets (Cloudflare's ``__cf_bm``) goes back on the next call."""
    for client in both.clients.values():
        both.respond = lambda r: httpx.Response(
            200, headers={"set-cookie": "__cf_bm=abc; Path=/; Secure"}, json=fixture("kill_ok")
        )
        await client.kill(TASK_ID)
        both.respond = lambda r: httpx.Response(200, json=fixture("detail_queued"))
        await client.detail(task_id=TASK_ID)
    plain, direct = both.seen["plain"][-1], both.seen["direct"][-1]
    assert plain.headers.get("cookie") == "__cf_bm=abc"
    assert wire(plain) == wire(direct)


async def test_a_closed_client_refuses_like_httpx(both: Both) -> None:
    await both.aclose()
    for client in both.clients.values():
        with pytest.raises(RuntimeError, match="client has been closed"):
            await client.detail(task_id=TASK_ID)


async def test_over_real_http_against_the_simulator(sim: Sim) -> None:
    """The production transport (httpcore over a socket), signed: Run, Detail,
    Task/List, Cancel, and a connection refused."""
    sim.configure(queue_s=30.0)  # still queued when cancelled
    http = WiroHTTP()
    assert http.direct is not None
    client = WiroClient(base_url=sim.base, api_key=SIM_KEY, api_secret=SIM_SECRET, http=http)
    try:
        accepted = await run(client)
        task = await client.detail(task_id=accepted.task_id)
        assert task.id == accepted.task_id
        assert any(t.id == accepted.task_id for t in await client.list_tasks(limit=5))
        cancelled = await client.cancel(accepted.task_id)
        assert cancelled is None or cancelled.id == accepted.task_id
        with pytest.raises(WiroStateError):
            await client.detail(task_id="0")
        down = WiroClient(
            base_url=f"http://127.0.0.1:{free_port()}/v1",
            api_key=SIM_KEY,
            api_secret=None,
            http=http,
        )
        with pytest.raises(WiroUnavailable):
            await run(down)  # never connected: provably not started
    finally:
        await http.aclose()
