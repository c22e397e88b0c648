"""Process helpers shared by the tests and the benchmark (no pytest import, so
``python -m bench`` can use them too)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
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
