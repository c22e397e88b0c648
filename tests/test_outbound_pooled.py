"""``Outbound`` on its own pool (``PoolTransport``, the gateway's case) hands a request
straight to the pool, without httpx's Request and Response (``Outbound._send_pooled``).
Over real sockets: the server reads the bytes httpx would have sent, cookies are kept and
sent back, and a body with no declared length is still capped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from app.http_pool import PoolTransport
from app.outbound import Outbound, OutboundTooLarge, Policy

PRIVATE_OK = Policy(allow_private=True)


def answer(body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-type: image/png", *extra]
    if not any(h.lower().startswith(b"transfer-encoding") for h in extra):
        head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class RawServer:
    """Keeps each request's bytes as read (head and declared body) and answers each with
    the next of ``answers`` (the last one again when they run out)."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                n = min(len(self.requests), len(self.answers)) - 1
                writer.write(self.answers[n])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0.01)


@pytest.fixture
async def opened(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[bytes]]:
    """The methods of the requests that reached ``PoolTransport.open`` (the pooled path;
    the httpx path goes through ``handle_async_request``)."""
    seen: list[bytes] = []
    real = PoolTransport.open

    async def counted(self: PoolTransport, request: object) -> object:
        seen.append(request.method)  # type: ignore[attr-defined]
        return await real(self, request)  # type: ignore[arg-type]

    monkeypatch.setattr(PoolTransport, "open", counted)
    yield seen


async def test_the_pooled_path_sends_what_httpx_sends(opened: list[bytes]) -> None:
    server = RawServer(answer(b"png"))
    async with server as base:
        out = Outbound()
        plain = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        headers = {"accept": "image/png, image/jpeg", "X-Trace": "t-1"}
        try:
            got = await out.request(
                "GET", f"{base}/o/0.png?x=1", policy=PRIVATE_OK, headers=headers
            )
            await out.request(
                "POST", f"{base}/hook", policy=PRIVATE_OK, headers=headers, content=b'{"a":1}'
            )
            host = base.removeprefix("http://")
            for method, path, content in (
                ("GET", "/o/0.png?x=1", None),
                ("POST", "/hook", b'{"a":1}'),
            ):
                request = plain.build_request(
                    method,
                    f"{base}{path}",
                    content=content,
                    headers={"Accept-Encoding": "identity", **headers, "Host": host},
                )
                await plain.send(request)
        finally:
            await out.aclose()
            await plain.aclose()
    assert opened == [b"GET", b"POST"]
    assert got.status_code == 200 and got.content == b"png"
    assert got.headers["content-type"] == "image/png" and got.address == "127.0.0.1"
    assert server.requests[0] == server.requests[2]
    assert server.requests[1] == server.requests[3]


async def test_cookies_are_kept_and_sent_back(opened: list[bytes]) -> None:
    server = RawServer(answer(b"a", b"set-cookie: s=1; Path=/"), answer(b"b"))
    async with server as base:
        out = Outbound()
        try:
            first = await out.request("GET", f"{base}/x", policy=PRIVATE_OK)
            second = await out.request("GET", f"{base}/x", policy=PRIVATE_OK)
        finally:
            await out.aclose()
    assert (first.content, second.content) == (b"a", b"b")
    assert b"cookie:" not in server.requests[0].lower()
    assert b"\r\ncookie: s=1\r\n" in server.requests[1].lower()
    assert opened == [b"GET"]  # with a cookie held, the request goes the httpx way


async def test_a_body_with_no_declared_length_is_capped(opened: list[bytes]) -> None:
    chunk = b"x" * 5000
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    server = RawServer(answer(body, b"transfer-encoding: chunked"))
    async with server as base:
        out = Outbound()
        try:
            with pytest.raises(OutboundTooLarge):
                await out.request("GET", f"{base}/big", policy=PRIVATE_OK, max_bytes=12_000)
            cut = await out.request(
                "GET", f"{base}/big", policy=PRIVATE_OK, max_bytes=12_000, truncate=True
            )
            whole = await out.request("GET", f"{base}/big", policy=PRIVATE_OK, max_bytes=20_000)
        finally:
            await out.aclose()
    assert opened == [b"GET"] * 3
    assert cut.truncated and cut.content == b"x" * 12_000
    assert not whole.truncated and whole.content == b"x" * 20_000
