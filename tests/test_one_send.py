"""``app.reads.OneSend``: a response's head leaves with its body in one write, and a head
with nothing after it in the same step of the event loop (a stream's first event not
there yet) still leaves at once. Over uvicorn and a real socket, then against a transport
that records its calls."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import uvloop

from app.reads import OneSend
from tests.test_gate_memory import small_reads_server


async def test_a_streamed_response_s_head_does_not_wait_for_its_body() -> None:
    """The client has the status and headers while the app still holds the body back;
    plain answers, kept-alive, arrive whole."""
    go_on = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await go_on.wait()
            await send({"type": "http.response.body", "body": b"late", "more_body": False})
            return
        body = scope["path"].encode() * 3
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async with small_reads_server(app) as server:
        base = f"http://127.0.0.1:{server.config.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            for path in ("/a", "/bb", "/ccc"):
                r = await http.get(path)
                assert (r.status_code, r.content) == (201, path.encode() * 3)
            try:
                async with http.stream("GET", "/stream") as streamed:
                    assert streamed.status_code == 200  # the head came while the body waits
                    go_on.set()
                    assert await streamed.aread() == b"late"
            finally:
                go_on.set()  # a failed wait (httpx's read timeout) lets the server stop


class _Recording:
    """A transport that keeps what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.calls.append(("writelines", b"".join(parts)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_the_head_and_the_body_are_one_call_and_nothing_is_lost() -> None:
    async def main() -> list[tuple[str, bytes]]:
        t = _Recording()
        sent = OneSend(t)  # type: ignore[arg-type]
        sent.write(HEAD)
        sent.write(b"ok")  # the body: with its head
        sent.write(b"more")  # not a head: at once
        sent.write(HEAD)
        await asyncio.sleep(0)  # the step ends: the head leaves alone
        await asyncio.sleep(0)
        sent.write(b"HTTP/1.1 " + b"x" * (64 * 1024))  # too long to hold
        sent.write(HEAD)
        sent.close()  # a held head is sent before the close
        assert sent.get_write_buffer_size() == 7  # everything else is the transport's
        await asyncio.sleep(0)
        return t.calls

    calls = uvloop.run(main())
    assert calls == [
        ("writelines", HEAD + b"ok"),
        ("write", b"more"),
        ("write", HEAD),
        ("write", b"HTTP/1.1 " + b"x" * (64 * 1024)),
        ("write", HEAD),
        ("close", b""),
    ]


def test_a_head_held_as_the_connection_closes_is_dropped() -> None:
    async def main() -> list[tuple[str, bytes]]:
        t = _Recording()
        sent = OneSend(t)  # type: ignore[arg-type]
        sent.write(HEAD)
        t.closing = True  # the peer went away
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return t.calls

    assert uvloop.run(main()) == []
