"""Every connection the gateway makes to a URL that came from a caller or the upstream
(notifications to a caller's ``webhook_url``, downloads of Wiro's outputs) goes through
``Outbound.request``, which enforces, in order:

1. the scheme is ``http`` or ``https`` and the URL carries no user info;
2. the host is in the allowlist, where the caller gives one (``GATEWAY_OUTPUT_HOSTS``);
3. the host is resolved **once** and every address it resolves to is checked: loopback,
   private, link-local, shared (CGNAT), reserved, multicast and unspecified addresses are
   refused unless ``allow_private`` (``GATEWAY_ALLOW_PRIVATE_NETWORKS``); cloud metadata
   addresses, multicast and unspecified ones are refused even then. IPv6 forms that carry
   an IPv4 address (mapped, compatible ``::a.b.c.d``, translated, NAT64 ``64:ff9b::/96``
   and the local-use ``64:ff9b:1::/48``, 6to4, Teredo) are judged by that IPv4 address;
   site-local (``fec0::/10``), local-use NAT64 and reserved IPv6 space count as private
   (Python's ``is_global`` passes them);
4. the connection goes to the address that was checked (the URL's host is replaced by
   that IP; ``Host`` and the TLS SNI/certificate check keep the original name), so a
   second DNS answer cannot redirect it (no DNS rebinding);
5. redirects are never followed (a 3xx comes back as a response for the caller to treat
   as a failure), environment proxies are ignored, and time and size are bounded: the
   body is streamed and reading stops at the cap.

Errors::

    OutboundError            transport trouble (DNS, connect, timeout): worth a retry
    └── OutboundRefused      the policy refused the URL or its addresses: do not retry
        └── OutboundTooLarge the body is over the cap
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from app.http_pool import KEEPALIVE_EXPIRY_S, PoolTransport, send_direct

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Instance metadata services; refused even when private networks are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "fd00:ec2::254",  # AWS IPv6 metadata
        "100.100.100.200",  # Alibaba Cloud
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 forms that carry an IPv4 address (RFC 4291, 2765, 6052, 3056, 4380); the IPv4
# address is what a packet to them ends up reaching, so it is the one judged.
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, but routed by some stacks
_V4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # a local network's own translator
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, still routed internally


class OutboundError(Exception):
    """The request could not be made or finished (DNS, connect, timeout, protocol)."""


class OutboundRefused(OutboundError):
    """The URL, its host or one of its addresses is not allowed. Retrying will not help."""


class OutboundTooLarge(OutboundRefused):
    """The response body is over the size cap."""


@dataclass(frozen=True)
class Policy:
    """What one kind of outbound request may reach."""

    allow_private: bool = False
    hosts: frozenset[str] | None = None  # None: any host; else exact names or "*.suffix"

    def host_allowed(self, host: str) -> bool:
        if self.hosts is None:
            return True
        host = host.lower().rstrip(".")
        for allowed in self.hosts:
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
            if host == allowed:
                return True
        return False


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: httpx.Headers
    content: bytes
    truncated: bool  # only with ``truncate=True``: the body went on past ``max_bytes``
    elapsed_ms: float
    address: str  # the IP that was connected to


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, where it stands for one."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _V4_COMPATIBLE:
        return _low32(ip) if int(ip) > 1 else None  # "::" and "::1" are judged as they are
    if ip in _V4_TRANSLATED or ip in _NAT64 or ip in _NAT64_LOCAL:
        return _low32(ip)  # local-use NAT64: the /96 layout, the likeliest one
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address (de-obfuscated)
    return None


def _non_public_v6(ip: IPAddress) -> str | None:
    """What Python's ``is_global`` lets through in IPv6 that is no public address."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip in _SITE_LOCAL:
        return "site-local"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if ip.is_reserved:  # outside 2000::/3 and the special blocks: not unicast anyone routes
        return "reserved"
    return None


def refusal(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why connecting to ``ip`` is not allowed, or None."""
    inner = _embedded_v4(ip)
    if inner is not None:
        why = refusal(inner, allow_private=allow_private)
        if why:
            return f"{why} (embedded in {ip})"
        relayed = isinstance(ip, ipaddress.IPv6Address) and (
            ip in _NAT64_LOCAL or ip.teredo is not None
        )
        if not relayed:
            return None  # a plain translation of a public (or allowed) IPv4 address
        # a local translator or a Teredo relay: the IPv6 address is judged as well
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    local_v6 = _non_public_v6(ip)
    if ip.is_global and local_v6 is None:
        return None
    if allow_private and (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip in _CGNAT
        or local_v6 in ("site-local", "local-use NAT64")
    ):
        return None
    for attr, what in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attr):
            return f"{ip} is a {local_v6 if attr == 'is_reserved' and local_v6 else what} address"
    if local_v6 is not None:
        return f"{ip} is a {local_v6} address"
    return f"{ip} is not a public address"


def literal_address(host: str) -> IPAddress | None:
    """``host`` (as a URL gives it) as an address, if it is a literal one: IPv6 in
    brackets, dotted IPv4, and the legacy IPv4 forms resolvers still accept (``127.1``,
    ``0x7f.0.0.1``, ``2130706433``). None for a name."""
    h = host.strip().strip("[]").split("%", 1)[0].rstrip(".")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h) and (h[0].isdigit()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def literal_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` can never be delivered to because its host is a literal refused
    address, or None (a name is judged when it is resolved, at delivery)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    ip = literal_address(host) if host else None
    return None if ip is None else refusal(ip, allow_private=allow_private)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, policy: Policy) -> httpx.URL:
    """Scheme, user info and host allowlist; the parsed URL."""
    try:
        parts = urlsplit(url)
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        raise OutboundRefused(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise OutboundRefused(f"scheme {parts.scheme!r} is not allowed (http or https only)")
    if parts.username is not None or parts.password is not None:
        raise OutboundRefused("URLs with user info are not allowed")
    if not parsed.host:
        raise OutboundRefused("the URL has no host")
    if not policy.host_allowed(parsed.host):
        raise OutboundRefused(f"host {parsed.host!r} is not in the allowlist")
    return parsed


class Outbound:
    """Safe outbound HTTP over one ``httpx.AsyncClient`` (made here: no redirects, no
    environment proxies). ``resolver`` is replaceable for tests."""

    def __init__(
        self,
        *,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: the context HTTPS servers are verified with (if None, httpx's default,
        certifi's CA bundle: one per process, ``default_tls``)."""
        self.resolver = resolver or system_resolver
        self._tls = tls
        # The transport the client would build for itself (no proxies: trust_env=False),
        # made here so that ``_send`` can hand requests to it directly (``send_direct``).
        self._own_pools = transport is None
        self._transport = transport or _new_pool(tls)
        self.http = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, transport=self._transport
        )
        # HTTPS connections, one pool per name (see ``_pool_for``).
        self._tls_pools: dict[str, PoolTransport] = {}

    async def aclose(self) -> None:
        await self.http.aclose()
        pools, self._tls_pools = list(self._tls_pools.values()), {}
        for pool in pools:
            await pool.aclose()

    async def _pool_for(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        """Where a request to ``url`` goes. A pool finds a connection to reuse by scheme,
        address and port, and the address here is the checked IP: over HTTPS a connection
        whose certificate was checked for one name would then carry a request for another
        name at the same address. So each HTTPS name has a pool of its own (at most
        ``TLS_POOLS``; past that, pools with nothing in flight are closed, oldest first)."""
        if not self._own_pools or url.scheme != "https":
            return self._transport
        name = url.host
        pool = self._tls_pools.pop(name, None) or _new_pool(self._tls)
        self._tls_pools[name] = pool  # the most recently used last
        if len(self._tls_pools) > TLS_POOLS:
            for old_name, old in list(self._tls_pools.items())[:-TLS_POOLS]:
                if old.idle():
                    del self._tls_pools[old_name]
                    await old.aclose()
        return pool

    async def resolve(self, url: httpx.URL, policy: Policy) -> IPAddress:
        """The one address to connect to: every answer must pass, the first is used."""
        host = url.host
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses: Iterable[IPAddress] = [literal]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                answers = await self.resolver(host, port)
            except (OSError, UnicodeError) as e:
                raise OutboundError(f"cannot resolve {host!r}: {e}") from None
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]
        addresses = list(addresses)
        if not addresses:
            raise OutboundError(f"{host!r} resolved to no address")
        for ip in addresses:
            why = refusal(ip, allow_private=policy.allow_private)
            if why:
                raise OutboundRefused(f"{host!r} resolves to a refused address: {why}")
        return addresses[0]

    async def request(
        self,
        method: str,
        url: str,
        *,
        policy: Policy,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        max_bytes: int = 1024 * 1024,
        truncate: bool = False,
    ) -> Response:
        """One request, no redirects; the whole exchange within ``timeout_s`` seconds, the
        TCP (and TLS) connect within ``connect_timeout_s`` if given.

        The body is read up to ``max_bytes``: past that, ``truncate=True`` keeps the first
        ``max_bytes`` and stops reading, otherwise ``OutboundTooLarge`` is raised.
        """
        parsed = check_url(url, policy)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                ip = await self.resolve(parsed, policy)
                timeout = httpx.Timeout(
                    timeout_s,
                    connect=min(timeout_s, connect_timeout_s if connect_timeout_s else timeout_s),
                )
                return await self._send(
                    method,
                    parsed,
                    ip,
                    headers or {},
                    content,
                    timeout,
                    max_bytes,
                    truncate,
                    started,
                )
        except TimeoutError:
            raise OutboundError(f"no complete answer within {timeout_s:g}s") from None
        except httpx.HTTPError as e:
            # Only the type and text: never the request (it may carry signatures).
            raise OutboundError(f"{type(e).__name__}: {e}".rstrip(": ")) from None

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        ip: IPAddress,
        headers: dict[str, str],
        content: bytes | None,
        timeouts: httpx.Timeout,
        max_bytes: int,
        truncate: bool,
        started: float,
    ) -> Response:
        # Connect to the checked address; the name stays in Host and in TLS (SNI and the
        # certificate check), so the server sees an ordinary request for its name.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        # identity: the cap counts the bytes as sent, and no decompression bomb
        sent = {"Accept-Encoding": "identity", **headers, "Host": url.netloc.decode("ascii")}
        pool = await self._pool_for(url)
        if (
            isinstance(pool, PoolTransport)
            and not self.http.cookies
            and (content is not None or method not in _EMPTY_BODY_SENT)
        ):
            return await self._send_pooled(
                pool,
                method,
                url,
                ip,
                sent,
                content,
                timeouts,
                extensions,
                max_bytes,
                truncate,
                started,
            )
        request = self.http.build_request(
            method,
            url.copy_with(host=str(ip)),
            content=content,
            headers=sent,
            timeout=timeouts,
            extensions=extensions,
        )
        response = await send_direct(self.http, pool, request, stream=True)
        try:
            _check_declared(response.headers, max_bytes, truncate)
            content_read, cut = await _capped(response.aiter_raw(), max_bytes, truncate)
        finally:
            await response.aclose()
        return Response(
            status_code=response.status_code,
            headers=response.headers,
            content=content_read,
            truncated=cut,
            elapsed_ms=(time.monotonic() - started) * 1000,
            address=str(ip),
        )

    async def _send_pooled(
        self,
        pool: PoolTransport,
        method: str,
        url: httpx.URL,
        ip: IPAddress,
        sent: dict[str, str],
        content: bytes | None,
        timeouts: httpx.Timeout,
        extensions: dict[str, Any],
        max_bytes: int,
        truncate: bool,
        started: float,
    ) -> Response:
        """``_send``'s request straight to the pool, without httpx's Request and Response
        (as ``WiroClient`` makes its JSON calls): the same bytes on the wire (httpx's
        header order: the client's, the call's, then ``Content-Length``), the same
        timeouts, errors (httpx's classes) and cookies kept. Only while the client holds
        no cookie (it would have to send it back) and the body is not an empty POST, PUT
        or PATCH (httpx sends those a ``Content-Length: 0`` first)."""
        merged = self.http.headers.copy()
        merged.update(sent)
        raw = list(merged.raw)
        if content is not None:
            raw.append((b"Content-Length", str(len(content)).encode("ascii")))
        host = str(ip)
        request = httpcore.Request(
            method.encode("ascii"),
            httpcore.URL(
                scheme=url.raw_scheme, host=host.encode("ascii"), port=url.port, target=url.raw_path
            ),
            headers=raw,
            content=content or b"",
            extensions={"timeout": timeouts.as_dict(), **extensions},
        )
        response = await pool.open(request)
        try:
            headers = httpx.Headers(response.headers)
            if "set-cookie" in headers or "set-cookie2" in headers:
                self.http.cookies.extract_cookies(
                    httpx.Response(
                        response.status,
                        headers=headers,
                        request=httpx.Request(method, url.copy_with(host=host)),
                    )
                )
            _check_declared(headers, max_bytes, truncate)
            content_read, cut = await _capped(pool.parts(response), max_bytes, truncate)
        finally:
            await response.aclose()
        return Response(
            status_code=response.status,
            headers=headers,
            content=content_read,
            truncated=cut,
            elapsed_ms=(time.monotonic() - started) * 1000,
            address=host,
        )


TLS_POOLS = 64  # HTTPS names whose pools an ``Outbound`` keeps (``Outbound._pool_for``)


@functools.cache
def default_tls() -> ssl.SSLContext:
    """httpx's default context (certifi's CA bundle), built once per process. Building
    one reads and parses the whole bundle: ~36 ms on the event loop's thread and ~0.7 MiB
    each on the build machine, which every HTTPS name's pool paid for a context of its
    own before (``docs/benchmarks.md``, fortieth round). One context serves any number of
    connections."""
    return httpx.create_ssl_context(trust_env=False)


def _new_pool(tls: ssl.SSLContext | None) -> PoolTransport:
    return PoolTransport(
        trust_env=False,
        limits=httpx.Limits(
            max_connections=50, max_keepalive_connections=10, keepalive_expiry=KEEPALIVE_EXPIRY_S
        ),
        tls=tls or default_tls(),
    )


# Methods httpx sends a ``Content-Length: 0`` when they carry no body.
_EMPTY_BODY_SENT = ("POST", "PUT", "PATCH")


def _check_declared(headers: httpx.Headers, max_bytes: int, truncate: bool) -> None:
    declared = headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > max_bytes:
        raise OutboundTooLarge(f"the body is {declared} bytes, over the {max_bytes} cap")


async def _capped(
    parts: AsyncIterator[bytes], max_bytes: int, truncate: bool
) -> tuple[bytes, bool]:
    """The body read up to ``max_bytes`` (see ``Outbound.request``), and whether it was cut."""
    chunks: list[bytes] = []
    seen = 0
    async for chunk in parts:
        seen += len(chunk)
        if seen > max_bytes:
            if not truncate:
                raise OutboundTooLarge(f"the body is over the {max_bytes} byte cap")
            chunks.append(chunk[: max_bytes - (seen - len(chunk))])
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False
