"""Helpers for tests that speak HTTP/1.1 to a server of their own over loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's bytes as they arrived: the head, then the body (``Content-Length``
    or chunked). ``asyncio.IncompleteReadError`` when the client closes first."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            more = await reader.read(65536)
            if not more:
                raise asyncio.IncompleteReadError(body, None)
            body += more
        return head + body
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def self_signed(directory: Path, *names: str) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for ``names`` (made with the ``openssl`` command) and a
    server context that presents it."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={names[0]}"),
            *("-addext", "subjectAltName=" + ",".join(f"DNS:{n}" for n in names)),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context
