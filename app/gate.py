"""The edge of the service: the one pure-ASGI layer of our own around the routes.

It opens each request's context (its ``X-Request-ID``, echoed on every answer, and log
fields: app/logs.py) and its SERVER span when tracing is on (app/tracing.py), and when
the answer is done records the HTTP metrics and writes the access line. (These were three
stacked middlewares; one costs a coroutine frame and a ``send`` wrapper per request
instead of three.) In between it decides from the request head.

Before any byte of a body is read, in this order:

1. request limits: all headers together (431), query string and path (414), NUL in the
   URL (400);
2. while the process drains (SIGTERM), ``/v1`` requests get 503 so callers retry on
   another replica (callbacks, health and metrics still answer);
3. ``/v1``: the bearer key (401; wrong keys from one address are answered 429 after a
   burst, without a key lookup, unless the key is known good here), then the client's
   request rate (429). The caller is put in the ASGI scope (``PRINCIPAL``) so the routes
   do not look the key up again;
4. a declared ``Content-Length`` over the route's limit (413);
5. ``POST /v1/uploads``: at most ``GATEWAY_MAX_CONCURRENT_UPLOADS`` at once (503).

A refusal with a large (over 64 KiB) or chunked body still on the wire carries
``Connection: close``: the body is not read, the connection ends (so do 401s without a
body); a small unread body is left for the server to discard. A body without
a usable ``Content-Length`` (chunked) is counted as it streams to the route, never
buffered here: past the limit the route's read fails and the answer is 413.

Callbacks are further screened in their route (``app.callback_gate``): the token is
matched before their body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from sqlalchemy.exc import DBAPIError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, metrics, tracing
from app.clients import MAX_KEY_LEN, Principal, key_digest
from app.errors import database_problem, problem
from app.ratelimit import RateLimiter
from app.settings import Settings

log = logging.getLogger(__name__)

PRINCIPAL = "hgw.principal"  # the scope key of the authenticated caller
MAX_PATH_CHARS = 2048
MULTIPART_ROOM = 64 * 1024  # an upload's limit: the file plus room for the framing
# A refused request's unread body up to this size is left for the server to discard
# (uvicorn reads and drops it, keeping the connection); a larger or unbounded one ends
# the connection after a short linger (``_linger_and_close``).
DISCARD_BYTES = 64 * 1024
LINGER_S = 2.0
LINGER_IDLE_S = 0.5


class BodyTooLarge(HTTPException):
    """Raised by the counting ``receive`` when a streamed body passes its limit. An
    ``HTTPException``, so FastAPI's body parsing lets it through to the 413 handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"The request body is over {limit} bytes.", headers={"Connection": "close"}
        )


class EdgeGate:
    """The checks of the module doc, in that order; then the app, with the body counted.
    State per process: the penalty box (by address) and the uploads streaming."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.s = settings
        self.auth_failures = RateLimiter()  # per address; see ``_authenticate``
        self.uploads_streaming = 0

    def limit_for(self, path: str) -> int:
        if path.startswith("/callbacks/"):
            return self.s.callback_body_limit_bytes
        if path == "/v1/uploads":
            return self.s.upload_max_bytes + MULTIPART_ROOM
        return self.s.body_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The request's context: its id, log fields, span; at the end its metrics and
        # access line (app/logs.py, app/tracing.py). Every answer carries X-Request-ID.
        rid, token = logs.open_request(scope)
        upstream = metrics.start_upstream_clock()
        started = time.perf_counter()
        status = 500
        limit = self.limit_for(scope["path"])
        seen = 0
        over = answered = False

        async def send_out(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        async def counting() -> Message:
            """The app's ``receive``: the body counted, ``BodyTooLarge`` past the limit."""
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded(message: Message) -> None:
            """The app's ``send``: whatever the app makes of an over-long body is dropped
            (the gate answers 413 once the app has returned); otherwise ``send_out``
            inlined (one wrapper per message)."""
            nonlocal answered, status
            if over:
                return
            if message["type"] == "http.response.start":
                answered = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        with tracing.server_span(scope) as span:
            try:
                refusal, upload = await self._screen(scope)
                if refusal is not None:
                    await _refuse(refusal, _Head(scope), scope, receive, send_out)
                    return
                if upload:
                    self.uploads_streaming += 1
                try:
                    await self.app(scope, counting, guarded)
                except BodyTooLarge:
                    pass  # answered below, outside this block
                finally:
                    if upload:
                        self.uploads_streaming -= 1
                # The 413 lingers (up to LINGER_S) only once the app has returned and the
                # exception is gone: its traceback holds the app's frames, and with them
                # the body chunks the route was parsing (3-4 of uvicorn's reads, ~250 KB
                # each, per connection) for as long as the linger lasts.
                if over and not answered:
                    answered = True
                    await _linger_and_close(_too_large(limit), receive, send_out)
            except BaseException as e:
                tracing.server_span_failed(span, e)
                raise
            finally:
                tracing.server_span_done(span, scope, status)
                logs.close_request(scope, status, time.perf_counter() - started, upstream[0], token)

    async def _screen(self, scope: Scope) -> tuple[Response | None, bool]:
        """The checks of the module doc: ``(refusal or None, whether it is an upload)``."""
        path: str = scope["path"]
        headers = _Head(scope)
        refusal = self._request_limits(scope, headers)
        api = path == "/v1" or path.startswith("/v1/")
        if refusal is None and api and getattr(scope["app"].state, "draining", False):
            refusal = problem(
                503,
                "Service Unavailable",
                "This instance is shutting down; retry.",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if refusal is None and api:
            refusal = await self._authenticate(scope, headers)
        limit = self.limit_for(path)
        if (
            refusal is None
            and headers.content_length is not None
            and headers.content_length > limit
        ):
            refusal = _too_large(limit)
        upload = api and path == "/v1/uploads" and scope["method"] == "POST"
        cap = self.s.max_concurrent_uploads
        if refusal is None and upload and cap and self.uploads_streaming >= cap:
            refusal = problem(
                503,
                "Service Unavailable",
                f"Over {cap} uploads at once; retry.",
                headers={"Retry-After": "1"},
            )
        return refusal, upload

    def _request_limits(self, scope: Scope, head: _Head) -> Response | None:
        """What the database cannot store (NUL: PostgreSQL rejects it in text) and what
        is too long to be a request anyone means."""
        query = scope.get("query_string") or b""
        path = scope.get("path") or ""
        if head.size > self.s.max_header_bytes:
            return problem(
                431,
                "Request Header Fields Too Large",
                f"The request headers are over {self.s.max_header_bytes} bytes.",
            )
        if len(query) > self.s.max_query_bytes:
            return problem(
                414, "URI Too Long", f"The query string is over {self.s.max_query_bytes} bytes."
            )
        if len(path) > MAX_PATH_CHARS:
            return problem(414, "URI Too Long", f"The path is over {MAX_PATH_CHARS} characters.")
        if "\x00" in path or b"%00" in query:
            return problem(400, "Bad Request", "The URL contains a NUL character.")
        return None

    async def _authenticate(self, scope: Scope, head: _Head) -> Response | None:
        """None with ``scope[PRINCIPAL]`` set, or the refusal."""
        scheme, _, key = head.authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_LEN:
            return _unauthorized("Missing or malformed bearer token.")
        state = scope["app"].state
        keyring = state.keyring
        digest = key_digest(key)
        address = (scope.get("client") or ("?", 0))[0]
        burst, rate = self.s.auth_failure_burst, self.s.auth_failure_rate_per_s
        boxed = burst > 0 and not keyring.vouched(digest)
        if boxed:
            wait = self.auth_failures.peek(address, rate=rate, burst=burst)
            if wait > 0:
                return _too_many(
                    f"Too many unknown keys from this address; retry after {math.ceil(wait)}s.",
                    wait,
                    close=True,
                )
        try:
            caller: Principal | None = await keyring.authenticate_digest(state.ctx.sm, digest)
        except DBAPIError as exc:
            return database_problem(exc)
        if caller is None:
            if boxed:
                self.auth_failures.take(address, rate=rate, burst=burst)
            return _unauthorized("Unknown API key.")
        wait = (
            state.rate_limiter.take(
                caller.client, rate=caller.limits.rate_per_s, burst=caller.limits.burst
            )
            if caller.limits.limits(scope.get("method", "GET"))
            else 0.0
        )
        if wait > 0:
            return _too_many(
                f"Over this client's limit of {caller.limits.rate_per_s:g} "
                f"requests/s; retry after {math.ceil(wait)}s.",
                wait,
            )
        scope[PRINCIPAL] = caller
        return None


class _Head:
    """What the gate reads of the request headers, in one pass."""

    __slots__ = ("authorization", "chunked", "content_length", "has_body", "size")

    def __init__(self, scope: Scope) -> None:
        self.authorization = ""
        self.content_length: int | None = None
        self.has_body = self.chunked = False
        size = 0
        for name, value in scope.get("headers") or ():
            size += len(name) + len(value) + 4
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    self.content_length = int(value)
                except ValueError:  # the server's parser refuses these already
                    self.content_length = None
                self.has_body = self.has_body or self.content_length != 0
            elif name == b"transfer-encoding":
                self.has_body = self.chunked = True
        self.size = size

    @property
    def large_body(self) -> bool:
        return self.chunked or (self.content_length or 0) > DISCARD_BYTES


async def _refuse(
    refusal: Response, head: _Head, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer a refusal decided from the head. A large or unbounded body still to come
    ends the connection (``_linger_and_close``); a small one is left for the server to
    discard, keeping the connection (see ``DISCARD_BYTES``). Without a body, 401s and the
    penalty box's 429s close the connection, other refusals keep it."""
    if head.large_body:
        await _linger_and_close(refusal, receive, send)
        return
    if head.has_body and refusal.status_code in (401, 429):
        del refusal.headers["connection"]
    await refusal(scope, receive, send)


async def _linger_and_close(refusal: Response, receive: Receive, send: Send) -> None:
    """The answer at once, with ``Connection: close``; then, before the connection is
    closed, up to ``LINGER_S`` (``LINGER_IDLE_S`` without data) of the body still arriving
    is read and dropped, never kept. Closing a socket with unread input sends a reset,
    which can destroy the answer before the client has read it (nginx's "lingering
    close"): this gives the client time to read it. Memory stays at the server's read
    buffer per connection."""
    refusal.headers["Connection"] = "close"
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status_code,
            "headers": refusal.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": refusal.body, "more_body": True})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_S
    with contextlib.suppress(TimeoutError):
        while True:
            wait = min(LINGER_IDLE_S, deadline - loop.time())
            if wait <= 0:
                break
            if not _more_body(await asyncio.wait_for(receive(), wait)):
                break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _more_body(message: Message) -> bool:
    """Whether more of the body is to come after ``message``. A function of its own so
    that the lingering loop keeps no reference to a message while it waits for the next:
    each holds one of uvicorn's reads (up to ~250 KB), and a name bound to the last one
    would keep it alive beside the read uvicorn is filling."""
    return message["type"] == "http.request" and bool(message.get("more_body", False))


def _unauthorized(detail: str) -> Response:
    return problem(
        401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer", "Connection": "close"}
    )


def _too_large(limit: int) -> Response:
    return problem(
        413,
        "Payload Too Large",
        f"The request body is over {limit} bytes.",
        headers={"Connection": "close"},
    )


def _too_many(detail: str, wait: float, *, close: bool = False) -> Response:
    headers = {"Retry-After": str(max(1, math.ceil(wait)))}
    if close:
        headers["Connection"] = "close"
    return problem(429, "Too Many Requests", detail, headers=headers)
