"""Deployment checks. (The request limits checked before routing -- header size, URL
length, NUL characters -- are in ``app.gate``. The ASGI server has its own limits:
uvicorn's h11 parser stops at 16 KiB of request line plus headers, httptools at 80 KiB.)
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


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
