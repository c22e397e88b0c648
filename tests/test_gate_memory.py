"""What a refused or over-long upload keeps in memory while the gate lingers before
closing (issue 16, bench P9): no body chunk once it has been read and dropped, none of
the chunks the app had read before its body passed the limit, and at most a small spool
of an upload's file in memory.

The gate runs here on its own around small ASGI apps, with a ``receive`` that hands out
chunks whose lifetime is watched with weak references (a chunk is freed by reference
counting the moment nothing holds it; no collection or waiting is involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from app.api.results import UPLOAD_SPOOL_BYTES
from app.gate import BodyTooLarge, EdgeGate
from app.main import create_app
from app.reads import READ_BYTES, UNREAD_BYTES, SmallReads
from app.settings import Settings
from tests.procs import free_port
from tests.signals import until


class Chunk(bytearray):
    """A body chunk that can be watched with a weak reference (a ``bytes`` subclass
    cannot be)."""


class Wire:
    """``receive`` for a chunked body of ``total`` chunks of ``size`` bytes. On each call
    it records which of the chunks handed out before are still alive."""

    def __init__(self, *, size: int, total: int) -> None:
        self.size, self.total = size, total
        self.handed: list[weakref.ref[Chunk]] = []
        self.alive_at_call: list[int] = []

    def alive(self) -> int:
        return sum(1 for ref in self.handed if ref() is not None)

    async def receive(self) -> dict[str, Any]:
        self.alive_at_call.append(self.alive())
        if len(self.handed) >= self.total:
            return {"type": "http.disconnect"}
        chunk = Chunk(self.size)
        self.handed.append(weakref.ref(chunk))
        return {
            "type": "http.request",
            "body": chunk,
            "more_body": len(self.handed) < self.total,
        }


def scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])


async def test_a_refusal_lingers_without_holding_what_it_dropped() -> None:
    """A refusal from the head (here: 503 while the process drains) reads and drops the
    body while it lingers: by each read, no chunk handed out before is still held."""

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be called")

    class State:
        draining = True

    class App:
        state = State()

    gate = EdgeGate(never, settings=Settings(env="test"))
    wire, sent = Wire(size=64 * 1024, total=6), Sent()
    await gate({**scope("/v1/uploads"), "app": App()}, wire.receive, sent)
    assert sent.status == 503
    assert len(wire.handed) == 6  # the whole body was read and dropped
    assert wire.alive_at_call == [0] * 6


@pytest.mark.parametrize("app_answers", [False, True], ids=["raises", "answers"])
async def test_an_over_long_body_lingers_without_the_apps_chunks(app_answers: bool) -> None:
    """The app keeps every chunk it reads (as a multipart parser holds its current
    chunk and its file); past the limit its read raises. Whether the app lets that
    propagate or answers it itself (as FastAPI's handler does), the 413 lingers only
    after the app has returned: none of the app's chunks is held while it does."""
    size, limit = 16 * 1024, 64 * 1024

    async def parser(scope: Any, receive: Any, send: Any) -> None:
        kept: list[bytes] = []
        try:
            while True:
                kept.append((await receive())["body"])
        except BodyTooLarge as e:
            if not app_answers:
                raise
            await send({"type": "http.response.start", "status": e.status_code, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    settings = Settings(env="test", body_limit_bytes=limit)
    gate = EdgeGate(parser, settings=settings)
    wire, sent = Wire(size=size, total=12), Sent()
    await gate(scope("/elsewhere"), wire.receive, sent)
    assert sent.status == 413
    assert [m["type"] for m in sent.messages].count("http.response.start") == 1
    read_by_app = limit // size + 1  # the last of them passed the limit
    assert len(wire.handed) == 12
    # The first ``read_by_app`` calls are the app's; every later one is the gate's
    # lingering read.
    assert wire.alive_at_call[read_by_app:] == [0] * (12 - read_by_app)


async def test_an_uploads_file_is_spooled_to_disk_past_64_kib() -> None:
    """Multipart files stay in memory up to 64 KiB, then go to a temporary file
    (Starlette's default spool is 1 MiB per upload: 32 uploads at once held 32 MiB)."""
    create_app(Settings(env="test"))
    assert MultiPartParser.spool_max_size == UPLOAD_SPOOL_BYTES == 64 * 1024
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + b"\0" * (64 * 1024 + 1) + b"\r\n--x--\r\n"
    )
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    request = Request({**scope("/v1/uploads"), "headers": headers}, receive)
    async with request.form() as form:
        upload = form["file"]
        assert isinstance(upload, UploadFile)
        assert upload.size == 64 * 1024 + 1
        assert upload._in_memory is False


async def test_the_server_stops_reading_one_small_read_past_its_mark() -> None:
    """With ``SmallReads``, what uvicorn holds of a body the app has not asked for is at
    most one read (``READ_BYTES``, 16 KiB) past ``UNREAD_BYTES`` (32 KiB; uvicorn's own
    mark is 64 KiB, and its own protocol reads 256 KB at a time). The app waits until
    the server has stopped reading the connection (its flow control paused, with 4 MiB
    pushed, so the kernel has far more waiting), then takes the body: the server held at
    most 48 KiB of it, and no message the app gets is larger."""
    app_may_read = asyncio.Event()
    sizes: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await app_may_read.wait()
        while True:
            message = await receive()
            sizes.append(len(message.get("body", b"")))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with small_reads_server(app) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        total = 4 * 1024 * 1024
        writer.write(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode())
        writer.write(b"\0" * total)  # buffered by the client's transport as needed
        connections = server.server_state.connections
        await until(lambda: len(connections) == 1, timeout=30, what="the connection")
        (http,) = connections
        await until(
            lambda: http.cycle is not None and http.flow.read_paused,
            timeout=30,
            what="the connection's reads paused",
        )
        held = len(http.cycle.body)
        app_may_read.set()
        assert (await reader.readline()).startswith(b"HTTP/1.1 204")
        writer.close()
    assert UNREAD_BYTES < held <= 48 * 1024
    assert UNREAD_BYTES + READ_BYTES == 48 * 1024 < HIGH_WATER_LIMIT
    assert sum(sizes) == total
    assert max(sizes) <= 48 * 1024


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connections_read_at_once_each_get_their_own_bytes(loop: str) -> None:
    """Every connection of a loop reads through one shared buffer: eight uploads pushed
    at once, each of its own byte, in pieces that interleave on the wire, each arrive
    whole and unmixed (the server's app counts each upload's bytes by value)."""
    import uvloop

    seen: dict[str, dict[int, int]] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        counts: dict[int, int] = {}
        while True:
            message = await receive()
            for value in set(message.get("body", b"")):
                counts[value] = counts.get(value, 0) + message["body"].count(value)
            if not message.get("more_body", False):
                break
        seen[scope["path"]] = counts
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    size = 3 * READ_BYTES + 123

    async def upload(port: int, n: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /{n} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        body = bytes([n]) * size
        for start in range(0, size, 10_000):
            writer.write(body[start : start + 10_000])
            await writer.drain()
            await asyncio.sleep(0)
        status = await reader.readline()
        writer.close()
        return status

    async def main() -> list[bytes]:
        async with small_reads_server(app) as server:
            return await asyncio.gather(*(upload(server.config.port, n) for n in range(1, 9)))

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        statuses = runner.run(main())
    assert all(s.startswith(b"HTTP/1.1 204") for s in statuses)
    assert seen == {f"/{n}": {n: size} for n in range(1, 9)}


@contextlib.asynccontextmanager
async def small_reads_server(app: Any) -> AsyncIterator[uvicorn.Server]:
    """uvicorn serving ``app`` through ``SmallReads`` on a free port, on the running loop
    (its port: ``server.config.port``)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", http=SmallReads)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await task
