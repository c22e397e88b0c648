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


BODY = b'{"result": true}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class Server:
    """A loopback HTTP/1.1 server answering every request on a connection with BODY;
    ``close_after`` answers per connection, then it closes the connection (no
    ``Connection: close``: the client finds out only from the socket)."""

    def __init__(self, *, close_after: int | None = None) -> None:
        self.close_after = close_after
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        answered = 0
        try:
            while self.close_after is None or answered < self.close_after:
                await read_request(reader)
                writer.write(ANSWER)
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ssl_context)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0.01)  # the handlers see their connections end


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
