"""``Outbound`` on its own pool (``PoolTransport``, the gateway's case) hands a request
straight to the pool, without httpx's Request and Response (``Outbound._send_pooled``).
Over real sockets: the server reads the bytes httpx would have sent, cookies are kept and
sent back, and a body with no declared length is still capped."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app import outbound
from app.http_pool import PoolTransport
from app.outbound import Outbound, OutboundError, OutboundTooLarge, Policy
from tests.loopback import read_request, self_signed

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
                self.requests.append(await read_request(reader))
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


async def _loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_to_the_checked_address_keeps_the_name(
    tmp_path: Path, opened: list[bytes]
) -> None:
    """Over TLS (asyncio's own, ``app.http_pool``): the connection goes to the address the
    name resolved to, while SNI and the certificate check use the name; a certificate for
    another name is refused."""
    cert, context = self_signed(tmp_path, "outputs.test")
    names: list[str] = []

    def sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name or "")

    context.sni_callback = sni  # type: ignore[assignment]
    server = RawServer(answer(b"png"))
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = server.server.sockets[0].getsockname()[1]

    out = Outbound(resolver=_loopback, tls=ssl.create_default_context(cafile=str(cert)))
    try:
        got = await out.request("GET", f"https://outputs.test:{port}/0.png", policy=PRIVATE_OK)
        # The same address under another name: a new connection, whose certificate (not
        # for that name) is refused; the first one's is not lent to it.
        with pytest.raises(OutboundError):
            await out.request("GET", f"https://other.test:{port}/0.png", policy=PRIVATE_OK)
        again = await out.request("GET", f"https://outputs.test:{port}/1.png", policy=PRIVATE_OK)
    finally:
        await out.aclose()
        await server.__aexit__(None, None, None)
    assert got.content == again.content == b"png" and got.address == "127.0.0.1"
    assert names == ["outputs.test", "other.test"]  # the third request reused the first's
    assert b"\r\nhost: outputs.test:%d\r\n" % port in server.requests[0].lower()
    assert len(server.requests) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_pools_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pool per HTTPS name, at most ``TLS_POOLS``: past that the oldest idle pool is
    closed (its connection with it), and a name seen again gets a new one."""
    monkeypatch.setattr(outbound, "TLS_POOLS", 2)
    cert, context = self_signed(tmp_path, "a.test", "b.test", "c.test")
    server = RawServer(answer(b"ok"))
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = server.server.sockets[0].getsockname()[1]
    out = Outbound(resolver=_loopback, tls=ssl.create_default_context(cafile=str(cert)))
    try:
        for name in ("a", "b", "a", "c"):
            await out.request("GET", f"https://{name}.test:{port}/", policy=PRIVATE_OK)
        kept = list(out._tls_pools)
        for _ in range(200):  # until the closed connection's end reaches the server
            if server.writers[1].is_closing():
                break
            await asyncio.sleep(0.01)
        closed = [w.is_closing() for w in server.writers]
        await out.request("GET", f"https://b.test:{port}/", policy=PRIVATE_OK)
    finally:
        await out.aclose()
        await server.__aexit__(None, None, None)
    assert kept == ["a.test", "c.test"]  # b.test, the least recently used, went
    assert closed == [False, True, False]  # connections of a, b, c in that order
    assert len(server.writers) == 4  # b.test connected anew


async def test_pools_share_one_default_tls_context() -> None:
    """Without a ``tls`` of its own, every pool of every ``Outbound`` in the process
    verifies with one context, httpx's default (certificates and names checked): building
    one costs ~36 ms on the loop and ~0.7 MiB, which each HTTPS name's pool paid before."""
    first, second = Outbound(resolver=_loopback), Outbound(resolver=_loopback)
    try:
        pools = [first._transport, second._transport]
        for name in ("a.test", "b.test", "a.test"):
            pools.append(await first._pool_for(httpx.URL(f"https://{name}/")))
        assert len({id(p) for p in pools}) == 4  # a.test's pool again the third time
        contexts = {id(p._pool._ssl_context) for p in pools}  # type: ignore[attr-defined]
    finally:
        await first.aclose()
        await second.aclose()
    shared = outbound.default_tls()
    assert contexts == {id(shared)}
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
