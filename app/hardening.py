"""Request limits checked before routing: header size, URL length, NUL characters.

The ASGI server has its own limits (uvicorn's h11 parser stops at 16 KiB of request
line plus headers, httptools at 80 KiB); these apply the gateway's, answer them as
problem+json, and keep what the database cannot store (NUL, which PostgreSQL rejects in
text) from reaching a query.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import problem

MAX_PATH_CHARS = 2048


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_query_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_query_bytes = max_query_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if sum(len(k) + len(v) + 4 for k, v in headers) > self.max_header_bytes:
            why = (431, "Request Header Fields Too Large",
                   f"The request headers are over {self.max_header_bytes} bytes.")
        elif len(scope.get("query_string") or b"") > self.max_query_bytes:
            why = (414, "URI Too Long",
                   f"The query string is over {self.max_query_bytes} bytes.")
        elif len(scope.get("path") or "") > MAX_PATH_CHARS:
            why = (414, "URI Too Long", f"The path is over {MAX_PATH_CHARS} characters.")
        elif "\x00" in scope.get("path", "") or b"%00" in (scope.get("query_string") or b""):
            why = (400, "Bad Request", "The URL contains a NUL character.")
        else:
            await self.app(scope, receive, send)
            return
        await problem(*why)(scope, receive, send)


def insecure_public_url(url: str) -> bool:
    """Whether callbacks to ``url`` would cross a network in the clear: plain http to a
    host that is not loopback (behind a TLS proxy, GATEWAY_PUBLIC_URL is its https URL)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True

