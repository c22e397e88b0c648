"""The gateway's HTTP client underneath httpx: httpcore's connection pool on asyncio's own
streams. ``PoolTransport`` is the transport of ``Outbound`` (downloads, notifications) and
of the Wiro client (``WiroHTTP``), whose JSON calls go straight to its pool
(``PoolTransport.open`` and ``read``); ``send_direct`` hands an httpx request to a
transport without the client's layers that have nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from app import metrics


async def _within(limit_s: float | None, awaitable: Awaitable[Any]) -> Any:
    if limit_s is None:
        return await awaitable
    async with asyncio.timeout(limit_s):
        return await awaitable


class _Stream(httpcore.AsyncNetworkStream):
    """One connection of the pool, on asyncio's own streams (its TLS too), in place of
    httpcore's anyio backend: the same bytes and httpcore's error classes, without anyio's
    per-call machinery (a cancel scope per read and write, a checkpoint per send) or its
    TLS, which runs every record through a Python memory BIO.

    httpcore asks every idle connection in the pool "has the server closed it?" each time
    it assigns a request (all of them, twice per request). The answer here is what the
    event loop has already seen of the socket, without a system call: the loop reads
    whatever arrives into the stream's reader at once, so bytes waiting, the peer's end
    (EOF), an error or a closing transport all mean "don't reuse". A close that reaches
    the socket while the current step of the loop runs is seen at the next; a close can
    race any check, as it can race the request itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    # httpcore's interface passes timeouts as arguments (hence the noqa: ASYNC109).
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            data: bytes = await _within(timeout, self._reader.read(max_bytes))
        except TimeoutError:
            raise httpcore.ReadTimeout("timed out reading") from None
        except (OSError, RuntimeError) as e:
            raise httpcore.ReadError(str(e) or type(e).__name__) from e
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            if self._writer.is_closing():
                raise ConnectionResetError("the connection is closed")
            self._writer.write(buffer)
            await _within(timeout, self._writer.drain())
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out writing") from None
        except (OSError, RuntimeError) as e:
            raise httpcore.WriteError(str(e) or type(e).__name__) from e

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        try:
            await _within(
                timeout, self._writer.start_tls(ssl_context, server_hostname=server_hostname)
            )
        except TimeoutError:
            await self.aclose()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, RuntimeError) as e:  # ssl.SSLError is an OSError
            await self.aclose()
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        except BaseException:  # cancelled mid-handshake: the connection is of no use
            self._writer.close()
            raise
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._readable()
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info in ("socket", "ssl_object"):
            return self._writer.get_extra_info(info)
        return None

    def _readable(self) -> bool:
        reader = self._reader
        return (
            bool(reader._buffer)  # type: ignore[attr-defined]  # no public "bytes waiting"
            or reader.at_eof()
            or reader.exception() is not None
            or self._writer.is_closing()
        )


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio's own streams (``_Stream``)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        try:
            reader, writer = await _within(
                timeout, asyncio.open_connection(host, port, local_addr=local)
            )
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out connecting") from None
        except (OSError, UnicodeError) as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            reader, writer = await _within(timeout, asyncio.open_unix_connection(path))
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out connecting") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        return _Stream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# httpx's own mapping (httpx/_transports/default.py), most specific class first.
_MAPPED_ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for source, target in _MAPPED_ERRORS:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


_CLOSING: set[asyncio.Task[None]] = set()  # closes left to finish (``_Pool._release``)

# What ``_Pool._assign_requests_to_connections`` sees of each connection.
_CLOSED, _EXPIRED, _IDLE, _HELD, _ORPHAN = (object() for _ in range(5))


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool, which takes back the connections that a cancelled request leaves
    behind (encode/httpcore#1093, open in 1.0.9, the version pinned).

    httpcore shields its clean-up from anyio's cancel scopes but not from asyncio's own
    cancellation (``asyncio.timeout``, ``wait_for``, a shutdown), which lands at any
    await, among them the one in every connection's state lock. Three points leave a
    connection that no rule of the pool ever removes, and once ``max_connections`` of
    them pile up, every request fails with ``PoolTimeout`` against a healthy server until
    the process restarts:

    - a request cancelled (or timing out on the pool) just after the pool handed it a
      new connection, before it connected: the connection stays ``CONNECTING``;
    - one cancelled after connecting, before its exchange began: open and ``NEW``;
    - one whose response is being closed when the cancellation lands: the connection
      stays ``ACTIVE`` and the request stays in the pool's queue, holding it.

    The first two are connections that no request in the queue holds, yet neither idle,
    closed nor expired (a connection in use always belongs to a request in the queue: a
    request leaves it on its error, or once its response is closed): each time the pool
    assigns requests, they are taken out and closed first. The third is caught where it
    happens: a response's close that ends with its request still in the queue takes the
    request out and closes its connection (``_Released``). Each such connection is
    counted (``gateway_outbound_connections_reclaimed_total``)."""

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        """httpcore's rules (1.0.9) with one look at each connection where httpcore takes
        several (it counts every connection again for each idle one, then scans them all
        twice per queued request): the pool runs this twice per request, and with the 4-20
        connections the Wiro client's pool holds under task lives that was ~6 % of a busy
        event loop (docs/benchmarks.md, thirty-ninth round). The orphans (above) go first and do not
        count; then, in order, a closed connection is dropped, an expired one closed, an
        idle one closed while the pool holds more than it keeps alive; then each queued
        request gets the first connection that can take it, else a new one below
        ``max_connections``, else a new one in place of the first idle connection, else it
        waits. Once a request of an origin waits, so do the later ones of that origin
        (nothing in the pass can free a connection for them) without another look: a
        backlog of queued requests costs each pass one look per connection, not one per
        connection and queued request (``docs/benchmarks.md``, forty-first round)."""
        held = {id(r.connection) for r in self._requests if r.connection is not None}
        connections = self._connections
        states = [
            _CLOSED
            if c.is_closed()
            else _EXPIRED
            if c.has_expired()
            else _IDLE
            if c.is_idle()
            else _HELD
            if id(c) in held
            else _ORPHAN
            for c in connections
        ]
        closing = [c for c, state in zip(connections, states, strict=True) if state is _ORPHAN]
        if closing:
            metrics.outbound_connections_reclaimed(len(closing))
        count = len(connections) - len(closing)
        kept: list[httpcore.AsyncConnectionInterface] = []
        for connection, state in zip(connections, states, strict=True):
            if state is _ORPHAN:
                continue
            if state is _CLOSED:
                count -= 1
            elif state is _EXPIRED or (state is _IDLE and count > self._max_keepalive_connections):
                closing.append(connection)
                count -= 1
            else:
                kept.append(connection)
        if len(kept) != len(connections):
            connections[:] = kept
        waiting: list[Any] = []  # origins whose queued request found nothing this pass
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            if origin in waiting:
                continue
            for connection in connections:
                if connection.can_handle_request(origin) and connection.is_available():
                    pool_request.assign_to_connection(connection)
                    break
            else:
                if len(connections) >= self._max_connections:
                    idle = next((c for c in connections if c.is_idle()), None)
                    if idle is None:
                        waiting.append(origin)
                        continue
                    connections.remove(idle)
                    closing.append(idle)
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
        return closing

    async def _close_connections(self, closing: list[httpcore.AsyncConnectionInterface]) -> None:
        if closing:  # else nothing to shield: httpcore enters anyio's cancel scope anyway
            await super()._close_connections(closing)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response = await super().handle_async_request(request)
        response.stream = _Released(response.stream, self)
        return response

    def _release(self, pool_request: Any) -> None:
        """Take a request whose response's close was cut short out of the queue, and
        close its connection (its state is unknown) in a task of its own."""
        if pool_request not in self._requests:
            return
        self._requests.remove(pool_request)
        closing: list[httpcore.AsyncConnectionInterface] = []
        connection = pool_request.connection
        if connection is not None and connection in self._connections:
            self._connections.remove(connection)
            closing.append(connection)
            metrics.outbound_connections_reclaimed(1)
        closing += self._assign_requests_to_connections()
        task = asyncio.get_running_loop().create_task(self._close_connections(closing))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)


class _Released:
    """A pool's response body (httpcore's ``PoolByteStream``) whose close always gives
    its request and connection back to the pool: if a cancellation cuts the close short
    (httpcore then never returns the connection, nor takes the request out of the queue),
    the pool finishes the job (``_Pool._release``)."""

    def __init__(self, body: Any, pool: _Pool) -> None:
        self._body = body
        self._pool = pool

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body.__aiter__()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            self._pool._release(self._body._pool_request)


# How long an idle keep-alive connection is kept: under the 5 s after which many servers
# close theirs (Node's and uvicorn's default, the simulator's). At httpx's default of 5 s
# a request could go out on a connection the server was closing (the client's 5 s start
# a little after the server's, later still on a busy loop) and fail before any answer:
# for a Run that is an ambiguous attempt, which waits for Task/List before it is sent
# again; for a download or a notification, a retry.
KEEPALIVE_EXPIRY_S = 4.0


class PoolTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncHTTPTransport(trust_env=..., limits=...)`` (no proxy: HTTP/1.1 over
    httpcore's connection pool, the same TLS context, the same errors), its connections
    on asyncio's own streams (``_Stream``): httpx gives no way to choose the pool's network
    backend, so this is its transport with that one choice made."""

    def __init__(
        self, *, limits: httpx.Limits, trust_env: bool, tls: ssl.SSLContext | None = None
    ) -> None:
        """``tls``: the context to verify servers with (httpx's default context if None)."""
        self._pool = _Pool(
            ssl_context=tls or httpx.create_ssl_context(trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=_Backend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped():
            response = await self._pool.handle_async_request(core)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def open(self, request: httpcore.Request) -> httpcore.Response:
        """The pool's answer to a ready-made httpcore request, its body unread: for a
        caller that needs no ``httpx.Response`` (``WiroClient``). Errors as httpx's."""
        with _mapped():
            return await self._pool.handle_async_request(request)

    @staticmethod
    async def read(response: httpcore.Response) -> bytes:
        """The whole body of an ``open`` answer, its errors mapped as ``_Body``'s; the
        caller closes ``response.stream`` as an ``httpx.Response`` would."""
        return b"".join([part async for part in PoolTransport.parts(response)])

    def idle(self) -> bool:
        """No request in flight on any of the pool's connections."""
        return all(c.is_idle() or c.is_closed() for c in self._pool.connections)

    @staticmethod
    async def parts(response: httpcore.Response) -> AsyncIterator[bytes]:
        """The body of an ``open`` answer as it arrives, its errors mapped as ``_Body``'s."""
        assert isinstance(response.stream, AsyncIterable)
        with _mapped():
            async for part in response.stream:
                yield part

    async def aclose(self) -> None:
        await self._pool.aclose()


async def send_direct(
    client: httpx.AsyncClient,
    transport: httpx.AsyncBaseTransport,
    request: httpx.Request,
    *,
    stream: bool,
) -> httpx.Response:
    """``client.send(request, stream=stream)`` for a ``client`` built on ``transport``
    with no auth, no event hooks and no redirects followed, without the layers that then
    have nothing to do (auth flow, redirect loop, hooks): the same request reaches the
    same transport, and the answer is the same response, its cookies kept by the client.

    ``CookieJar.extract_cookies`` reads only ``Set-Cookie`` and ``Set-Cookie2``, so it is
    skipped when neither is there (nearly always): a measurable share of a request."""
    if client.is_closed:
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    response = await transport.handle_async_request(request)
    response.request = request
    try:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            client.cookies.extract_cookies(response)
        if not stream:
            await response.aread()
    except BaseException:
        await response.aclose()
        raise
    return response
