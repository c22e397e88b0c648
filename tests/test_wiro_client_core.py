"""``WiroClient`` over ``PoolTransport`` talks to httpcore's pool directly
(``WiroClient._exchange``), without httpx's Request and Response. Compared here with the
path it replaced (``build_request`` + ``send_direct``) over real loopback sockets: the
bytes each sends, every answer's outcome (the error tree, fields and the transport error
under it), transport failures and timeouts, cookies, and the closed client."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpcore
import httpx
import pytest

from app.http_pool import PoolTransport
from app.wiro import WiroClient, WiroError, WiroUnavailable
from app.wiro import client as client_module
from app.wiro.client import LIMITS, WiroHTTP
from app.wiro.signing import NonceSource
from tests.loopback import read_request
from tests.procs import free_port
from tests.test_wiro_client import (
    FIXTURES,
    KEY,
    NON_RUN_CALLS,
    SECRET,
    TASK_ID,
    call_for_fixture,
    fixture,
    run,
)

HANG = b"hang"  # read the request, never answer
CLOSE = b"close"  # read the request, close the connection without a word
CALLS: dict[str, Callable[[WiroClient], Any]] = {**NON_RUN_CALLS, "run": run}
JSON_CALLS = [name for name in CALLS if name != "upload"]  # upload stays on httpx's path


def answer(
    status: int,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),),
    *,
    length: bool = True,
) -> bytes:
    head = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
    if length:
        head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def json_answer(status: int, body: Any, *extra: tuple[str, str]) -> bytes:
    return answer(status, json.dumps(body).encode(), (("content-type", "application/json"), *extra))


class RawWiro:
    """A loopback HTTP/1.1 server keeping every request's bytes (head and body) and
    answering each with ``reply``: raw response bytes (the connection then kept unless
    ``close``), ``HANG`` or ``CLOSE``."""

    def __init__(self) -> None:
        self.reply = json_answer(200, {"result": True})
        self.close = False
        self.requests: list[bytes] = []
        self.arrived = asyncio.Event()
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.stopping = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.append(writer)
        try:
            while True:
                self.requests.append(await read_request(reader))
                self.arrived.set()
                if self.reply == HANG:
                    await self.stopping.wait()
                    break
                if self.reply == CLOSE:
                    break
                writer.write(self.reply)
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.stopping.set()
        for writer in self.writers:
            writer.close()  # a handler waiting for a request sees the end of it
        await asyncio.gather(*self.handlers, return_exceptions=True)


def normalized(raw: bytes) -> bytes:
    """A request's bytes, a multipart body's random boundary made constant."""
    _, found, rest = raw.partition(b"boundary=")
    if not found:
        return raw
    boundary = rest.split(b"\r\n", 1)[0]
    return raw.replace(boundary, b"B")


class Pair:
    """Two WiroClients over their own ``WiroHTTP`` on ``PoolTransport``: ``old`` forced
    onto httpx's path (``build_request`` + ``send_direct``), ``new`` on httpcore's."""

    def __init__(self, base: str, *, timeout: httpx.Timeout | None = None, **limits: int) -> None:
        self.http: dict[str, WiroHTTP] = {}
        self.clients: dict[str, WiroClient] = {}
        for name in ("old", "new"):
            transport = PoolTransport(
                limits=httpx.Limits(**limits) if limits else LIMITS, trust_env=False
            )
            self.http[name] = WiroHTTP(transport)
            self.clients[name] = WiroClient(
                base_url=base,
                api_key=KEY,
                api_secret=SECRET,
                http=self.http[name],
                # The same clock for both, so that nonces and signatures are equal too.
                nonce_source=NonceSource(clock=lambda: 1_700_000_000.0),
                timeout=timeout,
            )
        assert self.clients["new"]._pool is self.http["new"].direct
        self.clients["old"]._pool = None

    async def outcomes(self, call: Callable[[WiroClient], Any], server: RawWiro) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, client in self.clients.items():
            start = len(server.requests)
            try:
                result: tuple[Any, ...] = ("ok", await call(client))
            except WiroError as e:
                cause = e.__cause__
                result = ("error", type(e), vars(e), str(e), type(cause), str(cause))
            out[name] = (result, [normalized(r) for r in server.requests[start:]])
        return out

    async def aclose(self) -> None:
        for http in self.http.values():
            await http.aclose()


@pytest.fixture
async def server() -> AsyncIterator[RawWiro]:
    s = RawWiro()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def pair(server: RawWiro) -> AsyncIterator[Pair]:
    p = Pair(server.base)
    yield p
    await p.aclose()


async def test_the_new_path_never_builds_an_httpx_request(
    server: RawWiro, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("httpx's path taken")

    monkeypatch.setattr(client_module, "send_direct", refuse)
    monkeypatch.setattr(pair.http["new"], "build_request", refuse)
    server.reply = json_answer(200, fixture("detail_queued"))
    task = await pair.clients["new"].detail(task_id=TASK_ID)
    assert task.id == TASK_ID


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
async def test_every_recorded_answer_ends_the_same(server: RawWiro, pair: Pair, name: str) -> None:
    for status in (200, 400, 401, 429, 500, 503):
        server.reply = json_answer(status, fixture(name))
        out = await pair.outcomes(call_for_fixture(name), server)
        assert out["old"] == out["new"], (name, status)
        assert len(out["new"][1]) == 1


GZIPPED = gzip.compress(json.dumps({"result": True, "tasklist": []}).encode())
ODD_ANSWERS = {
    "not json": answer(200, b"<html>not json</html>", (("content-type", "text/html"),)),
    "empty 204": answer(204, b""),
    "json array": answer(200, b"[1, 2]"),
    "utf-16 json": answer(200, json.dumps({"result": True}).encode("utf-16")),
    "429 retry-after": json_answer(429, {"result": False}, ("retry-after", "7")),
    "429 two retry-afters": json_answer(429, {}, ("retry-after", "7"), ("Retry-After", "9")),
    "429 past http date": json_answer(429, {}, ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")),
    "524": answer(524, b"a timeout", (("content-type", "text/plain"),)),
    "502 taskid": json_answer(502, {"taskid": "9"}),
    "401 empty": json_answer(401, {}),
    "gzip": answer(200, GZIPPED, (("Content-Encoding", "gzip"),)),
    "deflate": answer(
        200,
        zlib.compress(json.dumps({"result": True}).encode()),
        (("content-encoding", "deflate"),),
    ),
    "gzip, identity": answer(200, GZIPPED, (("content-encoding", "gzip, identity"),)),
    "unknown encoding": answer(200, b'{"result": true}', (("content-encoding", "snappy"),)),
    "corrupt gzip": answer(200, b"not gzip at all", (("content-encoding", "gzip"),)),
    "chunked": answer(
        200,
        b'7\r\n{"resul\r\n9\r\nt": true}\r\n0\r\n\r\n',
        (("transfer-encoding", "chunked"),),
        length=False,
    ),
    "short body": answer(200, b'{"result": true}')[:-3],
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
}


@pytest.mark.parametrize("call", JSON_CALLS)
@pytest.mark.parametrize("odd", sorted(ODD_ANSWERS))
async def test_odd_answers_end_the_same(server: RawWiro, pair: Pair, call: str, odd: str) -> None:
    server.reply = ODD_ANSWERS[odd]
    server.close = odd in ("short body", "garbage")  # the body ends where the socket does
    out = await pair.outcomes(CALLS[call], server)
    assert out["old"] == out["new"]


async def test_answers_with_connection_close_and_without_length(
    server: RawWiro, pair: Pair
) -> None:
    server.close = True
    for reply in (
        json_answer(200, fixture("kill_ok"), ("connection", "close")),
        answer(200, json.dumps(fixture("kill_ok")).encode(), length=False),
    ):
        server.reply = reply
        for _ in range(2):  # the second on a new connection
            out = await pair.outcomes(NON_RUN_CALLS["kill"], server)
            assert out["old"] == out["new"]
            assert out["new"][0][0] == "ok"


async def test_cookies_are_kept_and_sent_back_the_same(server: RawWiro, pair: Pair) -> None:
    """A cookie Wiro's edge sets (Cloudflare's ``__cf_bm``) goes back on the next calls,
    with one more set later and one expired."""
    replies = [
        json_answer(200, fixture("kill_ok"), ("set-cookie", "__cf_bm=abc; Path=/; HttpOnly")),
        json_answer(200, fixture("detail_queued")),
        json_answer(200, fixture("detail_queued"), ("Set-Cookie", "b=2; Path=/v1/Task")),
        json_answer(500, {}, ("set-cookie", "__cf_bm=gone; Max-Age=0; Path=/")),
        json_answer(200, fixture("detail_queued")),
    ]
    for reply in replies:
        server.reply = reply
        out = await pair.outcomes(NON_RUN_CALLS["detail"], server)
        assert out["old"] == out["new"]
    assert b"\r\nCookie: b=2\r\n" in server.requests[-1]
    jars = {name: sorted(http.cookies.jar, key=repr) for name, http in pair.http.items()}
    assert [repr(c) for c in jars["old"]] == [repr(c) for c in jars["new"]]


async def test_a_closed_client_refuses_like_httpx(pair: Pair) -> None:
    await pair.aclose()
    for client in pair.clients.values():
        with pytest.raises(RuntimeError, match="client has been closed"):
            await client.detail(task_id=TASK_ID)


# ---------------------------------------------------------------- transport failures

SHORT = httpx.Timeout(connect=0.3, read=0.3, write=0.3, pool=0.3)


async def both_fail(
    pair: Pair, cause: type[httpx.TransportError], server: RawWiro | None = None
) -> None:
    """Run and Detail fail the same way on both paths (a Run's ambiguity included), on
    the transport error ``cause``."""
    for call in (run, NON_RUN_CALLS["detail"]):
        out = await pair.outcomes(call, server or RawWiro())
        assert out["old"] == out["new"]
        assert out["new"][0][0] == "error"
        assert out["new"][0][4] is cause


async def test_connection_refused() -> None:
    pair = Pair(f"http://127.0.0.1:{free_port()}/v1", timeout=SHORT)
    try:
        await both_fail(pair, httpx.ConnectError)
    finally:
        await pair.aclose()


async def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops the SYN: the connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    await asyncio.sleep(0.05)
    pair = Pair(f"http://127.0.0.1:{port}/v1", timeout=SHORT)
    try:
        await both_fail(pair, httpx.ConnectTimeout)
    finally:
        await pair.aclose()
        for s in [*fillers, listener]:
            s.close()


@pytest.mark.parametrize(
    ("reply", "cause"),
    [(HANG, httpx.ReadTimeout), (CLOSE, httpx.RemoteProtocolError)],
    ids=["read timeout", "disconnected"],
)
async def test_no_answer(server: RawWiro, reply: bytes, cause: type[httpx.TransportError]) -> None:
    server.reply = reply
    pair = Pair(server.base, timeout=SHORT)
    try:
        await both_fail(pair, cause, server)
    finally:
        await pair.aclose()


async def test_pool_timeout(server: RawWiro) -> None:
    """The one connection allowed is busy: a Run never sent is provably not started."""
    server.reply = HANG
    timeout = httpx.Timeout(connect=1.0, read=10.0, write=1.0, pool=0.2)
    pair = Pair(server.base, timeout=timeout, max_connections=1)
    outcomes = {}
    try:
        for name, client in pair.clients.items():
            server.arrived.clear()
            busy = asyncio.create_task(client.detail(task_id=TASK_ID))
            await server.arrived.wait()
            try:
                await run(client)
            except WiroError as e:
                outcomes[name] = (type(e), vars(e), type(e.__cause__))
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
    finally:
        await pair.aclose()
    assert outcomes["old"] == outcomes["new"]
    assert outcomes["new"][0] is WiroUnavailable
    assert outcomes["new"][2] is httpx.PoolTimeout


class Failing(httpcore.AsyncNetworkStream):
    """A connection whose writes or reads fail with ``error``."""

    def __init__(self, error: Exception, on: str) -> None:
        self.error, self.on = error, on

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self.on == "read":
            raise self.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.on == "write":
            raise self.error

    async def aclose(self) -> None:
        pass


class FailingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, error: Exception, on: str) -> None:
        self.error, self.on = error, on

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        if self.on == "connect":
            raise self.error
        return Failing(self.error, self.on)


@pytest.mark.parametrize(
    ("error", "on", "cause"),
    [
        (httpcore.ConnectError("refused"), "connect", httpx.ConnectError),
        (httpcore.ConnectTimeout("slow"), "connect", httpx.ConnectTimeout),
        # httpcore swallows a write error to read an early answer: here b"", so...
        (httpcore.WriteError("broken pipe"), "write", httpx.RemoteProtocolError),
        (httpcore.WriteTimeout("full"), "write", httpx.WriteTimeout),
        (httpcore.ReadError("reset"), "read", httpx.ReadError),
        (httpcore.ReadTimeout("slow"), "read", httpx.ReadTimeout),
        (httpcore.UnsupportedProtocol("no"), "connect", httpx.UnsupportedProtocol),
    ],
)
async def test_every_failure_kind_ends_the_same(
    error: Exception, on: str, cause: type[httpx.TransportError]
) -> None:
    """Failures a loopback server cannot produce on demand (a write error or timeout,
    a reset), raised by the network layer under both paths."""
    pair = Pair("http://127.0.0.1:9/v1", timeout=SHORT)
    for http in pair.http.values():
        assert isinstance(http.direct, PoolTransport)
        http.direct._pool._network_backend = FailingBackend(error, on)
    try:
        await both_fail(pair, cause)
    finally:
        await pair.aclose()
