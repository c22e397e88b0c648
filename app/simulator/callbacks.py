"""The simulator's callbacks: when a task becomes terminal, POST it to its callback URL.

Wiro documents neither the callback's body nor its content type, so the body is a knob
(``callback_body``): the task as Detail shows it (JSON), its top-level fields
form-encoded, or nothing. Drops, duplicates, delays, a stale copy after the final one
("reorder") and retries are knobs too. A callback never raises into the simulator.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, Protocol
from urllib.parse import urlencode

import httpcore
import httpx

from app.http_pool import PoolTransport
from app.simulator.config import SimConfig
from app.simulator.state import SimTask


class Simulator(Protocol):
    """What of ``engine.Simulator`` the callbacks use (structural: the engine owns a
    ``Callbacks``, so importing it here would be a cycle)."""

    config: SimConfig
    counters: Counter[str]

    @property
    def http(self) -> httpx.AsyncClient: ...
    @property
    def pool(self) -> PoolTransport | None: ...

    def draw(self, rate: float) -> bool: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def wire(self, task: SimTask, at: float) -> dict[str, Any]: ...


CALLBACK_TIMEOUT_S = 10.0
_TIMEOUTS = dict.fromkeys(("connect", "read", "write", "pool"), CALLBACK_TIMEOUT_S)
USER_AGENT = "wiro-simulator"
JSON, FORM = "application/json", "application/x-www-form-urlencoded"


def form_fields(task: dict[str, Any]) -> dict[str, str]:
    """The task's top-level fields as form values (objects and lists as JSON text)."""
    out: dict[str, str] = {}
    for key, value in task.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


class Callbacks:
    """Schedules and delivers the callbacks of one ``Simulator``."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def on_terminal(self, task: SimTask) -> None:
        """Schedule the completion callback(s) of a task that just became terminal."""
        if not task.callbackurl:
            return
        sim, cfg = self.sim, self.sim.config
        if sim.draw(cfg.callback_drop):
            sim.counters["callbacks_dropped"] += 1
            task.callbacks.append({"kind": "final", "outcome": "dropped"})
            return
        final = sim.wire(task, time.monotonic())
        stale_at = task.stale_time() if cfg.callback_reorder else None
        stale = sim.wire(task, stale_at) if stale_at is not None else None
        sim.spawn(
            self._deliver(
                task,
                final,
                stale,
                copies=1 + cfg.callback_duplicate,
                delay=cfg.callback_delay_s,
                retries=cfg.callback_retries,
            )
        )

    async def _deliver(
        self,
        task: SimTask,
        final: dict[str, Any],
        stale: dict[str, Any] | None,
        *,
        copies: int,
        delay: float,
        retries: int,
    ) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(
            *(self.post(task, final, kind="final", retries=retries) for _ in range(copies))
        )
        if stale is not None:
            await self.post(task, stale, kind="reorder", retries=retries)

    def _encoded(self, body: dict[str, Any]) -> tuple[bytes, str | None]:
        """The body as sent, and its content type (as httpx encodes ``json=``/``data=``)."""
        shape = self.sim.config.callback_body
        if shape == "form":
            return urlencode(form_fields(body)).encode("ascii"), FORM
        if shape == "empty":
            return b"", None
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), JSON

    async def _send(self, url: str, body: dict[str, Any]) -> int:
        """POST one callback; its answer's status. Through the simulator's own pool
        straight (``PoolTransport.open``: httpx's Request, Response and client layers were
        ~half of a callback's CPU; no proxy from the environment either, the gateway is
        called directly), else through the client it was given (tests)."""
        content, kind = self._encoded(body)
        pool = self.sim.pool
        if pool is None:
            response = await self.sim.http.post(
                url,
                content=content,
                headers={"content-type": kind} if kind else None,
                timeout=CALLBACK_TIMEOUT_S,
            )
            return response.status_code
        target = httpx.URL(url)
        headers = [
            (b"Host", target.netloc),
            (b"Accept", b"*/*"),
            (b"User-Agent", USER_AGENT.encode("ascii")),
            (b"Content-Length", str(len(content)).encode("ascii")),
        ]
        if kind:
            headers.append((b"Content-Type", kind.encode("ascii")))
        answer = await pool.open(
            httpcore.Request(
                b"POST",
                httpcore.URL(
                    scheme=target.raw_scheme,
                    host=target.raw_host,
                    port=target.port,
                    target=target.raw_path,
                ),
                headers=headers,
                content=content,
                extensions={"timeout": _TIMEOUTS},
            )
        )
        try:
            await PoolTransport.read(answer)
        finally:
            await answer.aclose()
        return answer.status

    async def post(self, task: SimTask, body: dict[str, Any], *, kind: str, retries: int) -> bool:
        """POST ``body`` with retries; never raises (a callback must not break anything)."""
        counters = self.sim.counters
        shape = self.sim.config.callback_body
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            counters["callback_attempts"] += 1
            try:
                status = await self._send(task.callbackurl, body)
                outcome: int | str = status
                ok = 200 <= status < 300
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome, ok = f"{type(exc).__name__}: {exc}".rstrip(": "), False
            task.callbacks.append(
                {
                    "kind": kind,
                    "status": body["status"],
                    "body": shape,
                    "attempt": attempt,
                    "outcome": outcome,
                }
            )
            if ok:
                counters["callbacks_sent"] += 1
                return True
        counters["callbacks_failed"] += 1
        return False
