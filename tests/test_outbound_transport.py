"""``PoolTransport`` (``app.http_pool``): httpx's transport over httpcore's pool on
asyncio's own streams, with a cheap readability check of idle connections. Over real
sockets: keep-alive reuse, a connection the server closed while idle is noticed (never
reused: a Run on it would be ambiguous), TLS, httpx's error classes (timeouts among them)
and bodies sent whole."""

from __future__ import annotations

import asyncio
import inspect
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY

from app.http_pool import PoolTransport, _Backend
from app.outbound import _new_pool
from app.wiro.client import LIMITS, WiroHTTP
from tests.loopback import ANSWER, BODY, Server, read_request, self_signed
from tests.signals import until


def _stream_of(connection: Any) -> Any:
    """The ``_Stream`` under one of the pool's HTTP/1.1 connections."""
    return connection._connection._network_stream


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    yield s
    await s.stop()


async def test_keep_alive_connections_are_reused(server: Server) -> None:
    port = await server.start()
    async with httpx.AsyncClient(transport=PoolTransport(limits=LIMITS, trust_env=False)) as http:
        answers = await asyncio.gather(
            *(http.post(f"http://127.0.0.1:{port}/x", json={"i": i}) for i in range(4))
        )
        for _ in range(6):
            answers.append(await http.post(f"http://127.0.0.1:{port}/x", json={}))
    assert [r.json() for r in answers] == [{"result": True}] * 10
    assert server.connections <= 4


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    server = Server(close_after=1)
    port = await server.start()
    transport = PoolTransport(limits=LIMITS, trust_env=False)
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            for _ in range(3):
                r = await http.post(f"http://127.0.0.1:{port}/x", json={})
                assert r.status_code == 200
                # The server's close reaches the idle connection (the client's loop reads
                # its end of stream).
                await until(
                    lambda: all(c.has_expired() for c in transport._pool.connections),
                    what="the server's close to reach the idle connection",
                )
    finally:
        await server.stop()
    assert server.connections == 3


async def test_the_readability_check_sees_the_close(server: Server) -> None:
    port = await server.start()
    transport = PoolTransport(limits=LIMITS, trust_env=False)
    async with httpx.AsyncClient(transport=transport) as http:
        await http.post(f"http://127.0.0.1:{port}/x", json={})
        (connection,) = transport._pool.connections
        assert connection.is_idle() and not connection.has_expired()
        reader = _stream_of(connection)._reader
        for writer in server.writers:
            writer.close()
        await until(reader.at_eof, what="the client's loop to read the close")
        assert connection.has_expired()
        r = await http.post(f"http://127.0.0.1:{port}/x", json={})
        assert r.status_code == 200
    assert server.connections == 2


async def test_bytes_on_an_idle_connection_expire_it(server: Server) -> None:
    """A server that writes to an idle connection (a stray answer, a 408 before its close)
    has left it in an unknown state: it is not reused, though it is still open."""
    port = await server.start()
    transport = PoolTransport(limits=LIMITS, trust_env=False)
    async with httpx.AsyncClient(transport=transport) as http:
        await http.post(f"http://127.0.0.1:{port}/x", json={})
        (connection,) = transport._pool.connections
        assert not connection.has_expired()
        (writer,) = server.writers
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        reader = _stream_of(connection)._reader
        await until(lambda: len(reader._buffer) > 0, what="the client's loop to read them")
        assert connection.has_expired() and not connection.is_closed()
        r = await http.post(f"http://127.0.0.1:{port}/x", json={})
        assert r.status_code == 200
    assert server.connections == 2


async def test_errors_are_httpx_errors(server: Server) -> None:
    port = await server.start()
    await server.stop()
    async with httpx.AsyncClient(transport=PoolTransport(limits=LIMITS, trust_env=False)) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/x")

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads, never answers

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    quiet_port = quiet.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(
            transport=PoolTransport(limits=LIMITS, trust_env=False)
        ) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(f"http://127.0.0.1:{quiet_port}/x", timeout=0.2)
            with pytest.raises(httpx.WriteTimeout):  # more than the socket buffers take
                await http.post(
                    f"http://127.0.0.1:{quiet_port}/x", content=b"x" * (32 << 20), timeout=0.3
                )
            with pytest.raises(httpx.UnsupportedProtocol):
                await http.get(f"ftp://127.0.0.1:{quiet_port}/x")
    finally:
        quiet.close()
        for writer in held:
            writer.close()
        await asyncio.sleep(0.01)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_the_environment_s_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WiroHTTP over TLS (Wiro is HTTPS): the handshake, keep-alive, the name check, and
    the readability check of an idle TLS connection; ``SSL_CERT_FILE`` honoured as httpx
    does."""
    cert, context = self_signed(tmp_path, "localhost")
    server = Server()
    port = await server.start(context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    http = WiroHTTP()
    try:
        assert isinstance(http.direct, PoolTransport)
        for _ in range(4):
            r = await http.post(f"https://localhost:{port}/x", json={})
            assert r.json() == {"result": True}
        (connection,) = http.direct._pool.connections
        assert connection.is_idle() and not connection.has_expired()
        with pytest.raises(httpx.ConnectError):  # the certificate is not for this name
            await http.get(f"https://127.0.0.1:{port}/x")
    finally:
        await http.aclose()
        await server.stop()
    assert server.connections == 1  # kept alive (a refused handshake never gets here)


class Recorder(Server):
    """``Server`` that also keeps every request's bytes as it read them."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                self.requests.append(await read_request(reader))
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_requests_arrive_whole_on_one_connection() -> None:
    """A JSON body, a chunked one and one of several MiB, one after another on one
    kept-alive connection: the server reads exactly the bytes of each."""
    server = Recorder()
    port = await server.start()
    url = f"http://127.0.0.1:{port}/x"

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    big = bytes(range(256)) * (12 << 12)  # 12 MiB: more than the socket buffers take at once
    try:
        async with httpx.AsyncClient(
            transport=PoolTransport(limits=LIMITS, trust_env=False)
        ) as http:
            for content in (b'{"taskid":"1"}', chunks(), big):
                assert (await http.post(url, content=content)).status_code == 200
    finally:
        await server.stop()
    assert server.connections == 1
    assert server.requests[0].endswith(b'\r\n\r\n{"taskid":"1"}')
    assert server.requests[1].endswith(b"\r\n\r\n4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n")
    assert server.requests[2].endswith(b"\r\n\r\n" + big)


def _reclaimed() -> float:
    return REGISTRY.get_sample_value("gateway_outbound_connections_reclaimed_total") or 0.0


def _get(port: int, *, pool_s: float = 5.0) -> httpcore.Request:
    return httpcore.Request(
        b"GET",
        httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=b"/x"),
        headers=[(b"Host", f"127.0.0.1:{port}".encode())],
        extensions={"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": pool_s}},
    )


def _one_slot() -> PoolTransport:
    """A pool of one connection: one it never took back would fail every later request."""
    return PoolTransport(
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1), trust_env=False
    )


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _all_taken_back(transport: PoolTransport, port: int, reclaimed: float) -> None:
    """No connection and no request left in the pool, one more counted as taken back,
    and the pool's one slot answers the next request."""
    pool = transport._pool
    assert pool.connections == [] and pool._requests == []
    assert _reclaimed() == reclaimed + 1
    assert await _exchange(transport, _get(port, pool_s=2.0)) == BODY


async def _exchange(transport: PoolTransport, request: httpcore.Request) -> bytes:
    response = await transport.open(request)
    try:
        return await transport.read(response)
    finally:
        await response.aclose()


async def test_a_request_cancelled_as_it_is_handed_a_new_connection_leaves_none_behind(
    server: Server,
) -> None:
    """encode/httpcore#1093: a request cancelled (or timing out on the pool) just after
    the pool handed it a new connection, before it connected, left that connection in the
    pool for good; ``max_connections`` of them, and every request failed with
    ``PoolTimeout``. Here the pool holds one connection: a request waits for it, is handed
    a new one as the first answer is dropped unread (which closes the old), and is
    cancelled before it can run. The pool is empty again, and the next request gets the
    one slot."""
    port = await server.start()
    transport = _one_slot()
    pool = transport._pool
    reclaimed = _reclaimed()
    try:
        first = await transport.open(_get(port))
        waiting = asyncio.create_task(_exchange(transport, _get(port)))
        await until(lambda: any(r.is_queued() for r in pool._requests), what="the second to queue")
        await first.aclose()  # unread: the connection closes, a new one goes to the second
        assert [r.connection is not None for r in pool._requests] == [True]
        await _cancel(waiting)  # before it runs: its connection was never connected
        await _all_taken_back(transport, port, reclaimed)
    finally:
        await transport.aclose()
    assert server.connections == 2


class _CancelledOnConnect(_Backend):
    """Connects, then has the connecting request cancelled at its next await: the pool's
    connection is open but has never carried a request (HTTP/1.1 ``NEW``)."""

    def __init__(self) -> None:
        self.streams: list[Any] = []

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(*args, **kwargs)
        self.streams.append(stream)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        return stream


async def test_a_request_cancelled_once_connected_leaves_no_open_connection(
    server: Server,
) -> None:
    """The other orphan of #1093: cancelled between connecting and sending (at the
    connection's state lock), the request left an open connection that no request could
    take and nothing closed. It is closed and out of the pool at once."""
    port = await server.start()
    transport = _one_slot()
    pool = transport._pool
    backend = _CancelledOnConnect()
    pool._network_backend = backend
    reclaimed = _reclaimed()
    try:
        with pytest.raises(asyncio.CancelledError):
            await _exchange(transport, _get(port))
        (stream,) = backend.streams
        assert stream._writer.is_closing()
        pool._network_backend = _Backend()
        await _all_taken_back(transport, port, reclaimed)
    finally:
        await transport.aclose()
    assert server.connections == 2


async def test_a_response_whose_close_is_cancelled_gives_its_connection_back(
    server: Server,
) -> None:
    """The third orphan: a cancellation that lands while a response is being closed (at
    its connection's state lock) left the connection ``ACTIVE`` and the request in the
    pool's queue for good. The request leaves the queue and the connection is closed."""
    port = await server.start()
    transport = _one_slot()
    reclaimed = _reclaimed()
    try:
        response = await transport.open(_get(port))
        assert await transport.read(response) == BODY
        closing = asyncio.create_task(response.aclose())
        await asyncio.sleep(0)  # the close runs up to its first await, the state lock's
        await _cancel(closing)
        await _all_taken_back(transport, port, reclaimed)
    finally:
        await transport.aclose()
    assert server.connections == 2


async def test_idle_connections_are_retired_before_a_5_s_keep_alive_server_closes_them() -> None:
    """A server that closes idle connections after 5 s (uvicorn's default, so the
    simulator's; Node's too) could be closing the one a request goes out on if the client
    kept it as long (its 5 s start a little after the server's): the request fails before
    any answer (a Run is then ambiguous). Wiro's pool and the outbound pools (downloads,
    notifications) retire idle connections a second sooner."""
    server_s = inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default
    http = WiroHTTP()
    try:
        assert isinstance(http.direct, PoolTransport)
        for pool in (http.direct._pool, _new_pool(None)._pool):
            expiry = pool._keepalive_expiry
            assert expiry is not None and expiry <= server_s - 1.0
    finally:
        await http.aclose()
