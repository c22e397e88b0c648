"""Helpers for the results tests: a webhook secret, and tasks brought to a terminal
status through the real ``tasks._writes.transition`` (so the outbox hook runs) without a trip
through the upstream, which keeps these tests fast."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from sqlalchemy import select

from app.db import unit_of_work
from app.lifecycle import Status
from app.models import Delivery, DeliveryAttempt, Event, StoredOutput
from app.states import EventKind
from app.tasks import _writes
from tests.conftest import Gateway
from tests.rows import task_row

SECRET = "whsec_" + base64.b64encode(b"results-tests-secret-0123456789ab").decode()


async def finished_task(
    gw: Gateway,
    *,
    status: Status = Status.failed,
    client: str = "alpha",
    webhook_url: str | None = None,
    outputs: list[dict[str, Any]] | None = None,
    upstream_token: str | None = None,
    input_url: str = "https://example.com/me.jpg",
) -> str:
    now = gw.ctx.clock()  # the test's clock, if it stopped one (else the time)
    task = task_row(
        Status.running,
        now=now,
        client=client,
        input={"inputImageUrl": input_url},
        webhook_url=webhook_url,
        upstream_task_id="999",
        upstream_token=upstream_token,
    )
    values: dict[str, Any] = {}
    if status == Status.succeeded:
        values["outputs"] = outputs or []
    elif status in (Status.failed, Status.timed_out):
        values.update(error_code="upstream_failed", error_message="it broke")
    async with unit_of_work(gw.ctx.sm) as s:
        s.add(task)
        await s.flush()
        kind = {Status.cancelled: EventKind.cancelled, Status.timed_out: EventKind.timed_out}.get(
            status, EventKind.progressed
        )
        assert await _writes.transition(
            s,
            task.id,
            status,
            kind=kind,
            source="poll",
            now=now,
            message="made terminal by the test",
            **values,
        )
    return task.id


async def deliveries(gw: Gateway, task_id: str) -> list[Delivery]:
    async with gw.ctx.sm() as s:
        return list(
            (
                await s.scalars(
                    select(Delivery).where(Delivery.task_id == task_id).order_by(Delivery.id)
                )
            ).all()
        )


async def attempts(gw: Gateway, delivery_id: str) -> list[DeliveryAttempt]:
    async with gw.ctx.sm() as s:
        return list(
            (
                await s.scalars(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == delivery_id)
                    .order_by(DeliveryAttempt.number)
                )
            ).all()
        )


async def outputs_of(gw: Gateway, task_id: str) -> list[StoredOutput]:
    async with gw.ctx.sm() as s:
        return list(
            (
                await s.scalars(
                    select(StoredOutput)
                    .where(StoredOutput.task_id == task_id)
                    .order_by(StoredOutput.idx)
                )
            ).all()
        )


async def events_of(gw: Gateway, task_id: str, source: str | None = None) -> list[Event]:
    async with gw.ctx.sm() as s:
        q = select(Event).where(Event.task_id == task_id)
        if source:
            q = q.where(Event.source == source)
        return list((await s.scalars(q.order_by(Event.id))).all())


async def until(predicate, timeout: float = 15.0, every: float = 0.05):
    """Poll an async predicate until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(every)
