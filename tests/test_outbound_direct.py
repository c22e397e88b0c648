"""``Outbound`` hands its requests to its transport directly (``send_direct``); what
reaches the transport and what the caller gets must be what ``httpx.AsyncClient.send``
gave: the same request, cookies kept and sent back, errors mapped the same."""

from __future__ import annotations

import httpx
import pytest

from app.http_pool import send_direct
from app.outbound import Outbound, OutboundError, OutboundTooLarge, Policy

PRIVATE_OK = Policy(allow_private=True)
URL = "http://127.0.0.1:9/hook?x=1"


def wire(request: httpx.Request) -> tuple[object, ...]:
    return (request.method, str(request.url), request.headers.raw, request.content)


async def test_the_request_is_the_one_the_client_would_send() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204, stream=httpx.ByteStream(b""))

    out = Outbound(transport=httpx.MockTransport(handler))
    plain = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), follow_redirects=False, trust_env=False
    )
    try:
        await out.request(
            "POST", URL, policy=PRIVATE_OK, headers={"content-type": "a/b"}, content=b"{}"
        )
        timeout = seen[0].extensions["timeout"]
        request = plain.build_request(
            "POST",
            URL,
            content=b"{}",
            headers={
                "Accept-Encoding": "identity",
                "content-type": "a/b",
                "Host": "127.0.0.1:9",
            },
            timeout=httpx.Timeout(**timeout),
        )
        await plain.send(request, stream=True)
    finally:
        await out.aclose()
        await plain.aclose()
    assert wire(seen[0]) == wire(seen[1])
    assert seen[0].extensions == seen[1].extensions


async def test_cookies_are_kept_and_sent_back() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, headers={"set-cookie": "s=1; Path=/"}, stream=httpx.ByteStream(b"ok")
        )

    out = Outbound(transport=httpx.MockTransport(handler))
    try:
        first = await out.request("GET", URL, policy=PRIVATE_OK)
        await out.request("GET", URL, policy=PRIVATE_OK)
    finally:
        await out.aclose()
    assert first.content == b"ok" and first.headers["set-cookie"] == "s=1; Path=/"
    assert "cookie" not in seen[0].headers
    assert seen[1].headers["cookie"] == "s=1"


async def test_errors_while_reading_the_body_are_mapped() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"abc"
            raise httpx.ReadError("connection reset")

    out = Outbound(transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=Broken())))
    try:
        with pytest.raises(OutboundError, match="ReadError: connection reset"):
            await out.request("GET", URL, policy=PRIVATE_OK)
        big = Outbound(
            transport=httpx.MockTransport(
                lambda r: httpx.Response(
                    200, headers={"content-length": "99"}, stream=httpx.ByteStream(b"x" * 99)
                )
            )
        )
        with pytest.raises(OutboundTooLarge):
            await big.request("GET", URL, policy=PRIVATE_OK, max_bytes=10)
        await big.aclose()
    finally:
        await out.aclose()


async def test_a_closed_client_refuses_like_httpx() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(204))
    client = httpx.AsyncClient(transport=transport)
    await client.aclose()
    request = client.build_request("GET", URL)
    with pytest.raises(RuntimeError, match="client has been closed"):
        await client.send(request)
    with pytest.raises(RuntimeError, match="client has been closed"):
        await send_direct(client, transport, request, stream=False)


async def test_a_full_read_closes_the_response() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=b"body"))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await send_direct(
            client, transport, client.build_request("GET", URL), stream=False
        )
    assert response.content == b"body" and response.is_closed
    assert response.request.url == URL
