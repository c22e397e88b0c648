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

import httpx

from app.simulator.config import SimConfig
from app.simulator.state import SimTask


class Simulator(Protocol):
    """What of ``engine.Simulator`` the callbacks use (structural: the engine owns a
    ``Callbacks``, so importing it here would be a cycle)."""

    config: SimConfig
    counters: Counter[str]

    @property
    def http(self) -> httpx.AsyncClient: ...

    def draw(self, rate: float) -> bool: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def wire(self, task: SimTask, at: float) -> dict[str, Any]: ...


CALLBACK_TIMEOUT_S = 10.0


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

    def _request_kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        shape = self.sim.config.callback_body
        if shape == "form":
            return {"data": form_fields(body)}
        if shape == "empty":
            return {"content": b""}
        return {"json": body}

    async def post(self, task: SimTask, body: dict[str, Any], *, kind: str, retries: int) -> bool:
        """POST ``body`` with retries; never raises (a callback must not break anything)."""
        counters = self.sim.counters
        shape = self.sim.config.callback_body
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            counters["callback_attempts"] += 1
            try:
                response = await self.sim.http.post(
                    task.callbackurl, timeout=CALLBACK_TIMEOUT_S, **self._request_kwargs(body)
                )
                outcome: int | str = response.status_code
                ok = 200 <= response.status_code < 300
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
