"""Outbound URL safety: what the gateway may connect to when a URL came from a caller
(webhook_url) or the upstream (output URLs)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from app.outbound import (
    Outbound,
    OutboundError,
    OutboundRefused,
    OutboundTooLarge,
    Policy,
    check_url,
    literal_refusal,
    refusal,
)
from tests.conftest import Sim, run_gateway, task_body
from tests.receivers import Answer, serve_receiver

PUBLIC = Policy(allow_private=False)
PRIVATE_OK = Policy(allow_private=True)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "fe80::1",
        "fc00::1",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:7f00:1::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_private=False)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # IPv4-compatible ::a.b.c.d (Python's is_global says True for these)
        ("::10.0.0.1", "10.0.0.1 is a private address"),
        ("::127.0.0.1", "127.0.0.1 is a loopback address"),
        ("::169.254.169.254", "cloud metadata"),
        # IPv4-mapped and IPv4-translated (::ffff:0:a.b.c.d)
        ("::ffff:10.0.0.1", "10.0.0.1 is a private address"),
        ("::ffff:0:7f00:1", "127.0.0.1 is a loopback address"),
        # NAT64: the well-known prefix, and the local-use one even with a public IPv4 inside
        ("64:ff9b::7f00:1", "127.0.0.1 is a loopback address"),
        ("64:ff9b:1::a00:1", "10.0.0.1 is a private address"),
        ("64:ff9b:1::808:808", "local-use NAT64"),
        # 6to4 and Teredo with a private IPv4 inside (Teredo's client address is inverted)
        ("2002:a9fe:a9fe::1", "cloud metadata"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1 is a private address"),
        # site-local (deprecated, still routed internally) and other reserved IPv6 space
        ("fec0::1", "site-local"),
        ("feff::1", "site-local"),
        ("4000::1", "reserved"),
    ],
)
def test_ipv6_forms_are_judged_by_what_they_reach(address: str, why: str) -> None:
    refused = refusal(ipaddress.ip_address(address), allow_private=False)
    assert refused is not None and why in refused, refused


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("::10.0.0.1", True),
        ("fec0::1", True),
        ("64:ff9b:1::a00:1", True),
        ("::169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("4000::1", False),
    ],
)
def test_ipv6_forms_with_private_networks_allowed(address: str, allowed: bool) -> None:
    assert (refusal(ipaddress.ip_address(address), allow_private=True) is None) is allowed


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "2606:4700::1111",
        "8.8.8.8",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",  # a public IPv4 inside
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_private=False) is None


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://10.0.0.1/x", True),
        ("http://[::ffff:127.0.0.1]/", True),
        ("http://169.254.169.254/latest", True),
        ("http://[::a00:1]/", True),
        ("http://[fec0::1]:8080/", True),
        ("http://127.1/", True),
        ("http://2130706433/", True),
        ("http://0x7f.0.0.1/", True),
        ("https://[fe80::1%25eth0]/", True),
        ("https://hooks.example.com/x", False),
        ("https://8.8.8.8/x", False),
        ("https://127.example.com/", False),
        ("https://1e100.net/", False),
    ],
)
def test_literal_hosts_are_judged_without_resolving(url: str, refused: bool) -> None:
    assert (literal_refusal(url, allow_private=False) is not None) is refused


async def test_a_literal_private_webhook_url_is_refused_at_submit(
    db_url: str, sim: Sim, tmp_path
) -> None:
    """422 at submit with the error at ``webhook_url``; nothing recorded. A name is
    accepted (it is resolved and judged at delivery), as is any address with
    GATEWAY_ALLOW_PRIVATE_NETWORKS."""
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, allow_private_networks=False
    ) as gw:
        for url in (
            "http://10.0.0.1/x",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/",
            "http://[::7f00:1]/",
        ):
            r = await gw.client().post("/v1/tasks", json=task_body(sim) | {"webhook_url": url})
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert [e["loc"] for e in r.json()["errors"]] == [["webhook_url"]], r.text
        listed = (await gw.client().get("/v1/tasks")).json()["data"]
        assert listed == []
        r = await gw.client().post(
            "/v1/tasks", json=task_body(sim) | {"webhook_url": "https://hooks.example.invalid/x"}
        )
        assert r.status_code == 202, r.text
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, allow_private_networks=True
    ) as gw:
        r = await gw.client().post(
            "/v1/tasks", json=task_body(sim) | {"webhook_url": "http://10.0.0.1/x"}
        )
        assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.0.0.5", True),
        ("169.254.1.1", True),
        ("::ffff:10.0.0.5", True),
        # never, whatever the setting: metadata services, multicast, unspecified
        ("169.254.169.254", False),
        ("fd00:ec2::254", False),
        ("::ffff:169.254.169.254", False),
        ("100.100.100.200", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
    ],
)
def test_allow_private_networks_still_refuses_metadata(address: str, allowed: bool) -> None:
    assert (refusal(ipaddress.ip_address(address), allow_private=True) is None) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a",
        "file:///etc/passwd",
        "gopher://x/",
        "javascript:alert(1)",
        "https://user:pw@example.com/",
        "http:///nohost",
        "not a url",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused):
        check_url(url, PUBLIC)


def test_host_allowlist() -> None:
    policy = Policy(hosts=frozenset({"cdn1.wiro.ai", "*.example.net"}))
    check_url("https://cdn1.wiro.ai/a/0.png", policy)
    check_url("https://CDN1.wiro.ai./a/0.png", policy)
    check_url("https://a.b.example.net/x", policy)
    for url in (
        "https://cdn1.wiro.ai.evil.com/",
        "https://evil.com/cdn1.wiro.ai",
        "https://example.net.evil.com/",
        "https://wiro.ai/",
    ):
        with pytest.raises(OutboundRefused, match="allowlist"):
            check_url(url, policy)


async def test_loopback_targets_are_refused_before_connecting() -> None:
    async with serve_receiver() as rec:
        port = rec.url.rsplit(":", 1)[1]
        out = Outbound()
        try:
            for url in (
                f"http://127.0.0.1:{port}/a",
                f"http://localhost:{port}/a",
                f"http://[::1]:{port}/a",
                "http://169.254.169.254/latest/meta-data/",
                f"http://[::ffff:127.0.0.1]:{port}/a",
                f"http://0.0.0.0:{port}/a",
            ):
                with pytest.raises(OutboundRefused):
                    await out.request("GET", url, policy=PUBLIC)
            # metadata stays refused with private networks allowed
            with pytest.raises(OutboundRefused, match="metadata"):
                await out.request("GET", "http://169.254.169.254/latest/", policy=PRIVATE_OK)
        finally:
            await out.aclose()
        assert rec.calls == []


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "innocent.example" else ["93.184.215.14"]

    out = Outbound(resolver=resolver)
    try:
        with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1"):
            await out.request("GET", "http://innocent.example/hook", policy=PUBLIC)
    finally:
        await out.aclose()


async def test_every_resolved_address_must_pass() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.7"]

    out = Outbound(resolver=resolver)
    try:
        with pytest.raises(OutboundRefused, match=r"10\.0\.0\.7"):
            await out.request("GET", "http://mixed.example/", policy=PUBLIC)
    finally:
        await out.aclose()


async def test_connects_to_the_checked_address_with_the_original_host() -> None:
    """Resolved once; the connection goes to that IP and Host keeps the name, so a second
    DNS answer (rebinding) cannot change where it goes."""
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    seen: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        seen.append(host)
        return next(answers)

    async with serve_receiver() as rec:
        port = int(rec.url.rsplit(":", 1)[1])
        out = Outbound(resolver=resolver)
        try:
            r = await out.request(
                "GET", f"http://hooks.internal.test:{port}/ping", policy=PRIVATE_OK
            )
        finally:
            await out.aclose()
    assert r.status_code == 204 and r.address == "127.0.0.1"
    assert seen == ["hooks.internal.test"]  # one lookup only
    assert rec.calls[0].headers["host"] == f"hooks.internal.test:{port}"


async def test_ipv6_loopback_is_reachable_only_when_allowed() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    out = Outbound()
    try:
        with pytest.raises(OutboundRefused, match="loopback"):
            await out.request("GET", "http://[::1]:9/", policy=PUBLIC)
        # allowed: it gets as far as connecting (nothing listens on port 9)
        with pytest.raises(OutboundError) as info:
            await out.request("GET", "http://[::1]:9/", policy=PRIVATE_OK, timeout_s=2)
        assert not isinstance(info.value, OutboundRefused)
    finally:
        await out.aclose()


async def test_redirects_are_not_followed() -> None:
    async with serve_receiver() as rec:
        rec.on("/start", default=Answer(302, headers={"location": f"{rec.url}/target"}))
        out = Outbound()
        try:
            r = await out.request("GET", f"{rec.url}/start", policy=PRIVATE_OK)
        finally:
            await out.aclose()
    assert r.status_code == 302
    assert rec.hits("/target") == []


async def test_body_size_is_capped() -> None:
    async with serve_receiver() as rec:
        rec.on("/big", default=Answer(200, body=b"x" * 300_000))
        out = Outbound()
        try:
            with pytest.raises(OutboundTooLarge):
                await out.request("GET", f"{rec.url}/big", policy=PRIVATE_OK, max_bytes=100_000)
            r = await out.request(
                "GET", f"{rec.url}/big", policy=PRIVATE_OK, max_bytes=1024, truncate=True
            )
        finally:
            await out.aclose()
    assert r.truncated and r.content == b"x" * 1024


async def test_time_is_bounded() -> None:
    async with serve_receiver() as rec:
        rec.on("/slow", default=Answer(200, body=b"late", delay_s=1.2))
        out = Outbound()
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(OutboundError, match="within"):
                await out.request("GET", f"{rec.url}/slow", policy=PRIVATE_OK, timeout_s=0.3)
            assert asyncio.get_running_loop().time() - started < 1
        finally:
            await out.aclose()


async def test_unresolvable_host_is_a_retryable_error() -> None:
    out = Outbound()
    try:
        with pytest.raises(OutboundError) as info:
            await out.request("GET", "http://no-such-host.invalid/", policy=PUBLIC, timeout_s=5)
        assert not isinstance(info.value, OutboundRefused)
    finally:
        await out.aclose()


async def test_the_connect_timeout_is_its_own() -> None:
    """A notification's connect is bounded apart from the whole exchange
    (GATEWAY_NOTIFY_CONNECT_TIMEOUT_S), so an address that never accepts fails fast."""
    import httpx

    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(204, stream=httpx.ByteStream(b""))

    out = Outbound(transport=httpx.MockTransport(handler))
    try:
        await out.request(
            "POST", "http://127.0.0.1:9/h", policy=PRIVATE_OK, timeout_s=10, connect_timeout_s=3
        )
        await out.request("POST", "http://127.0.0.1:9/h", policy=PRIVATE_OK, timeout_s=10)
    finally:
        await out.aclose()
    assert seen[0]["connect"] == 3 and seen[0]["read"] == 10
    assert seen[1]["connect"] == 10
