"""The one process harness of the tests and the benchmark: the simulator and gateways as
subprocesses, the gateway in this event loop under uvicorn, and /proc readings.

No pytest and no ``app`` import here, so ``python -m bench`` uses it too, also when its
subprocesses run another checkout's code (``cwd``: ``BENCH_APP_ROOT``, bench/harness.py).
Every process started here is remembered, so a run can stop whatever is left
(``stop_all``) however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent

# Every simulator knob, reset to these before each test (and each benchmark step), so a
# test sees the simulator it asks for whatever ran before it.
SIM_DEFAULTS: dict[str, Any] = {
    "queue_s": 0.2,
    "run_s": 0.6,
    "callback_drop": 0.0,
    "callback_duplicate": 0,
    "callback_delay_s": 0.0,
    "callback_reorder": False,
    "callback_early": False,
    "run_5xx_rate": 0.0,
    "run_429_rate": 0.0,
    "detail_5xx_rate": 0.0,
    "fail_rate": 0.0,
    "lost_rate": 0.0,
    "task_error_s": 0.0,
    "task_error_fatal_rate": 0.0,
    "run_hang_s": 0.0,
    "run_drop_connection": False,
    "max_concurrency": 0,
    "balance_exhausted": False,
    "task_error_stuck_rate": 0.0,
    "run_server_error_rate": 0.0,
    "run_server_error_count": 0,
    "run_server_error_status": 200,
    "omit_pexit": False,
    "task_list_enabled": True,
    "task_list_callbackurl": True,
    "callback_body": "detail",
    "callback_retries": 3,
    "sign_required": True,
    "nonce_reuse_rejected": True,
}

_children: list[subprocess.Popen[bytes]] = []
_logs: list[Path] = []  # every spawned process's log, for ``watchdog_records``


def _ports() -> range:
    """Where ``free_port`` looks: below the kernel's ephemeral range, so no outgoing
    connection (this run opens thousands) can take a port between the probe and the
    server's own bind, as one did in CI (a receiver's uvicorn failed with EADDRINUSE);
    one slice per pytest-xdist worker, so two workers never pick the same port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = 10000 if low > 12000 else 1024
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (low - start) // workers
    return range(start + worker * size, start + (worker + 1) * size)


_next_port: list[int] = []


def free_port() -> int:
    """A loopback port nothing listens on (see ``_ports``), a different one each call
    until the slice wraps round."""
    ports = _ports()
    if not _next_port:  # a random start: two runs on one machine rarely meet
        _next_port.append(ports.start + int.from_bytes(os.urandom(2), "big") % len(ports))
    for _ in range(len(ports)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < ports.stop else ports.start
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {ports}")


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``url`` answers below 500 (a process started: on a busy machine its imports
    alone can take many seconds, so the bound is generous), or ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} came up")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def bin_env(**extra: str) -> dict[str, str]:
    """The environment for a gateway/simulator subprocess: ours, minus any GATEWAY_/SIM_
    setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "SIM_"))}
    env.update(extra)
    return env


def spawn(
    args: list[str], env: dict[str, str], log: Path, *, module: str = "app.cli", cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """``python -m <module> <args>`` in ``cwd`` (its own process group, output to
    ``log``); remembered for ``stop_all``."""
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children.append(proc)
    if module == "app.cli":  # not the watchdog's tests' hung processes (tests/stuck_serve.py)
        _logs.append(log)
    return proc


def log_records(log: Path) -> list[dict[str, Any]]:
    """A process's JSON log records (stack dumps and other lines skipped)."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def overruns(log: Path) -> list[dict[str, Any]]:
    """The shutdown watchdogs' records in ``log`` (``shutdown_overrun``, ``worker_overrun``:
    app/cli.py)."""
    return [r for r in log_records(log) if r.get("shutdown_overrun") or r.get("worker_overrun")]


def watchdog_records() -> list[str]:
    """The watchdogs' records (``overruns``) in the logs of the processes spawned here, one
    JSON line each: a process whose exit hung, whether or not its test noticed."""
    found = []
    for log in dict.fromkeys(_logs):
        with contextlib.suppress(OSError):
            found += [json.dumps(r) for r in overruns(log)]
    return found


def stop(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, *, grace_s: float = 20.0
) -> None:
    """Signal the process group and wait for it; SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ValueError):
        _children.remove(proc)


def stop_all() -> None:
    """Stop every process started here that is still alive."""
    for proc in list(_children):
        with contextlib.suppress(Exception):
            stop(proc)


# ---------------------------------------------------------------- /proc readings

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (not its children), or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


# ---------------------------------------------------------------- the simulator


@dataclass
class Sim:
    """A running simulator (``headshot-gateway simulate``) and its control endpoints."""

    url: str
    proc: subprocess.Popen[bytes]
    defaults: dict[str, Any] = field(default_factory=lambda: dict(SIM_DEFAULTS))

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    @property
    def portrait(self) -> str:
        return f"{self.url}/samples/portrait.jpg"

    def configure(self, **knobs: Any) -> dict[str, Any]:
        r = httpx.patch(f"{self.url}/__sim/config", json=knobs, timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def reset(self, **knobs: Any) -> None:
        """Forget every task and counter; every knob back to ``defaults``, then ``knobs``."""
        httpx.post(f"{self.url}/__sim/reset", timeout=30).raise_for_status()
        self.configure(**{**self.defaults, **knobs})

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/__sim/stats", timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)


def start_sim(
    log: Path,
    *,
    api_key: str,
    api_secret: str,
    cwd: Path = ROOT,
    defaults: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **knobs: Any,
) -> Sim:
    """A simulator on a free loopback port knowing ``api_key``/``api_secret``, its knobs
    set to ``defaults`` (else ``SIM_DEFAULTS``) + ``knobs``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(
        ["simulate", "--port", str(port)],
        bin_env(SIM_API_KEY=api_key, SIM_API_SECRET=api_secret, SIM_PUBLIC_URL=url, **(env or {})),
        log,
        cwd=cwd,
    )
    try:
        wait_http(f"{url}/__sim/config", proc=proc)
    except BaseException:
        stop(proc)
        raise
    sim = Sim(url=url, proc=proc, defaults=dict(SIM_DEFAULTS if defaults is None else defaults))
    sim.reset(**knobs)
    return sim


# ---------------------------------------------------------------- an app in this loop


@contextlib.asynccontextmanager
async def serving(app: Any, port: int, *, server_class: Any = None) -> AsyncIterator[Any]:
    """Serve the ASGI ``app`` under uvicorn on a loopback ``port`` in this event loop
    (its lifespan included) until the block ends; yields the server (a
    ``uvicorn.Server``, or of ``server_class``)."""
    import uvicorn

    server = (server_class or uvicorn.Server)(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # it failed to start: raise why
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task
