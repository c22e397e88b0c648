"""CPU of one outbound request on the gateway's HTTP client, against a loopback server.

``python -m bench.http_client [-n N]`` (not part of ``make bench``: it measures the
client, not the gateway): keep-alive requests one after another, the CPU time of this
process's thread per request (``time.thread_time``), the median of five rounds, for

- a Wiro call: a signed JSON ``POST`` straight through the pool (``PoolTransport.open``
  and ``read``, as ``WiroClient`` makes its JSON calls), a 2 KiB answer;
- a download: ``Outbound.request("GET", ...)`` of a 60 KiB body (a stored output's path);

each over plain HTTP and over TLS (a self-signed certificate made with the ``openssl``
command, trusted by the client's context), on uvloop as ``serve`` runs. The server is a
small asyncio protocol in a process of its own, so none of its work is counted. For an
A/B comparison run it on the other checkout's code: ``PYTHONPATH=$BENCH_APP_ROOT python
-m bench.http_client``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpcore
import httpx

from app.outbound import Outbound, Policy, PoolTransport

SERVER = r"""
import asyncio, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def answer(size):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
    return head + b"content-length: %d\r\n\r\n" % size + b"x" * size
SMALL, LARGE = answer(2048), answer(61440)
class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.transport.write(LARGE if head.startswith(b"GET") else SMALL)
async def main():
    tls = None
    if cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, "127.0.0.1", port, ssl=tls)
    await server.serve_forever()
asyncio.run(main())
"""

PAYLOAD = b'{"taskid":"4421357","socketaccesstoken":"' + b"t" * 40 + b'"}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _certificate(workdir: Path) -> tuple[str, str]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _per_request_us(
    one: Callable[[], Awaitable[None]], n: int, server_pid: int
) -> tuple[float, float]:
    """Median CPU per request of this thread, and the server's over all the rounds."""
    for _ in range(200):  # connections made, caches warm
        await one()
    rounds = []
    server_before = _process_cpu_s(server_pid)
    for _ in range(5):
        t = time.thread_time()
        for _ in range(n):
            await one()
        rounds.append((time.thread_time() - t) / n * 1e6)
    server_us = (_process_cpu_s(server_pid) - server_before) / (5 * n) * 1e6
    return statistics.median(rounds), server_us


async def _measure(
    base: str, context: ssl.SSLContext | None, n: int, server_pid: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    pool = PoolTransport(
        trust_env=False, limits=httpx.Limits(max_connections=50, max_keepalive_connections=10)
    )
    if context is None:
        outbound = Outbound()
    else:
        pool._pool._ssl_context = context
        try:
            outbound = Outbound(tls=context)  # type: ignore[call-arg, unused-ignore]
        except TypeError:  # a checkout from before Outbound took a TLS context
            outbound = Outbound()
            assert isinstance(outbound._transport, PoolTransport)
            outbound._transport._pool._ssl_context = context
    url = httpx.URL(base + "/Task/Detail")
    core_url = httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )
    headers = [
        (b"Host", url.netloc),
        (b"Accept", b"*/*"),
        (b"Content-Type", b"application/json"),
        (b"x-api-key", b"k" * 32),
        (b"x-nonce", b"1764850000000123"),
        (b"x-signature", b"s" * 64),
        (b"Content-Length", str(len(PAYLOAD)).encode()),
    ]
    timeout = {"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}

    async def wiro_call() -> None:
        request = httpcore.Request(
            b"POST", core_url, headers=headers, content=PAYLOAD, extensions={"timeout": timeout}
        )
        response = await pool.open(request)
        try:
            assert len(await pool.read(response)) == 2048
        finally:
            await response.aclose()

    policy = Policy(allow_private=True)

    async def download() -> None:
        got = await outbound.request("GET", base + "/0.png", policy=policy, max_bytes=1 << 20)
        assert got.status_code == 200 and len(got.content) == 61440

    try:
        return (
            await _per_request_us(wiro_call, n, server_pid),
            await _per_request_us(download, n, server_pid),
        )
    finally:
        await pool.aclose()
        await outbound.aclose()


async def _run(n: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="hgw-http-client-"))
    try:
        for tls in (False, True):
            cert, key = _certificate(workdir) if tls else ("", "")
            port = _free_port()
            server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), cert, key])
            try:
                for _ in range(100):
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.05)
                context = ssl.create_default_context(cafile=cert) if tls else None
                base = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
                wiro, download = await _measure(base, context, n, server.pid)
            finally:
                server.kill()
                server.wait()
            print(
                f"{'TLS' if tls else 'plain'}: CPU per request, client (server): "
                f"Wiro call (POST, 2 KiB answer) {wiro[0]:.0f} µs ({wiro[1]:.0f} µs), "
                f"download (GET, 60 KiB) {download[0]:.0f} µs ({download[1]:.0f} µs)",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_client")
    p.add_argument("-n", type=int, default=1000, help="requests per round")
    n = p.parse_args().n
    try:  # the event loop ``serve`` runs on (uvicorn picks uvloop when it is installed)
        import uvloop
    except ImportError:
        asyncio.run(_run(n))
    else:
        uvloop.run(_run(n))


if __name__ == "__main__":
    main()
