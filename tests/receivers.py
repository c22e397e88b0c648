"""A small HTTP server for tests that play the far end of the gateway's outbound calls
(a caller's webhook receiver, a CDN): scripted answers, every request recorded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import free_port


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Answer:
    status: int = 204
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Receiver:
    """Answers each request with the next scripted ``Answer`` for its path (or the
    path's default), and records it."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    script: dict[str, list[Answer]] = field(default_factory=dict)
    default: dict[str, Answer] = field(default_factory=dict)

    def on(self, path: str, *answers: Answer, default: Answer | None = None) -> None:
        self.script[path] = list(answers)
        if default is not None:
            self.default[path] = default

    def hits(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    async def wait_calls(self, path: str, n: int, timeout: float = 15.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while len(self.hits(path)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {len(self.hits(path))} of {n} calls")
            await asyncio.sleep(0.02)
        return self.hits(path)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        self.calls.append(Call(request.method, path, dict(request.headers), body, time.monotonic()))
        queue = self.script.get(path)
        answer = queue.pop(0) if queue else self.default.get(path, Answer())
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        return Response(answer.body, status_code=answer.status, headers=answer.headers)


@contextlib.asynccontextmanager
async def serve_receiver(**_: Any) -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = Starlette(
        routes=[Route("/{path:path}", rec.handle, methods=["GET", "POST", "PUT", "HEAD"])]
    )
    port = free_port()
    rec.url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    try:
        yield rec
    finally:
        server.should_exit = True
        await serving


@dataclass
class Tarpit:
    """Accepts connections, reads what comes, never answers: the worst webhook receiver.
    ``open``/``most`` count connections held now / at most at once."""

    url: str = ""
    accepted: int = 0
    open: int = 0
    most: int = 0


@contextlib.asynccontextmanager
async def serve_tarpit(host: str = "127.0.0.2") -> AsyncIterator[Tarpit]:
    """On its own loopback address by default, so that it is another host than the
    receivers on 127.0.0.1."""
    pit = Tarpit()
    writers: set[asyncio.StreamWriter] = set()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pit.accepted += 1
        pit.open += 1
        pit.most = max(pit.most, pit.open)
        writers.add(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            pit.open -= 1
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(hold, host, 0)
    pit.url = f"http://{host}:{server.sockets[0].getsockname()[1]}"
    try:
        yield pit
    finally:
        server.close()
        held = list(writers)
        for w in held:
            w.close()
        for w in held:  # closed before the loop ends, not by the garbage collector later
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await server.wait_closed()
