"""Outputs copied before the terminal write (``app.outbox.copy_first``): a task that Wiro
reports succeeded is recorded with its outputs already stored, so it succeeds with the
gateway's URLs; those not stored within ``GATEWAY_OUTPUT_COPY_FIRST_S`` (slow, failed)
are left to the output loop, as every output was before."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.db import unit_of_work
from app.lifecycle import Status
from app.models import Task
from app.outbox import Copies, OutputHandoff, copy_first
from app.results import present
from app.tasks import apply_detail
from app.wiro import UpstreamTask
from tests.conftest import Sim, run_gateway, task_body
from tests.receivers import Answer, serve_receiver
from tests.results_helpers import outputs_of, until
from tests.rows import task_row


def _copied_first(outcome: str) -> float:
    value = REGISTRY.get_sample_value("gateway_outputs_copied_first_total", {"outcome": outcome})
    return value or 0.0


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (30, 90, 150)).save(buf, "PNG")
    return buf.getvalue()


async def _task(gw: Any, task_id: str) -> Task:
    async with gw.ctx.sm() as s:
        task = await s.scalar(select(Task).where(Task.id == task_id))
    assert task is not None
    return task


@pytest.mark.parametrize(
    ("first_s", "in_child"),
    [(10.0, False), (10.0, True), (0.0, False)],
    ids=["copied-first", "copied-first-by-the-output-process", "off"],
)
async def test_success_is_recorded_with_its_outputs_stored(
    db_url: str, sim: Sim, tmp_path: Path, first_s: float, in_child: bool
) -> None:
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        output_hosts="127.0.0.1",
        output_copy_first_s=first_s,
        output_process=in_child,
    ) as gw:
        r = await gw.client().post("/v1/tasks", json=task_body(sim, outputFormat="png"))
        task_id = r.json()["id"]
        await gw.wait_terminal(task_id)
        # Until stored, ``outputs[0].sha256`` is null: wait for that either way.
        await until(lambda: _stored_view(gw, task_id))
        task = await _task(gw, task_id)
        [row] = await outputs_of(gw, task_id)
        assert task.status == Status.succeeded and row.state == "stored"
        assert task.outputs == [present(row, gw.url)]
        assert row.sha256 == hashlib.sha256((tmp_path / row.storage_key).read_bytes()).hexdigest()
        child = gw.app.state.services.output_process
        assert (child is not None and child.started == 1) if in_child else child is None
        if first_s:
            # Stored by the terminal write itself, in one download, leased to no one.
            assert row.stored_at == task.completed_at
            assert (row.attempts, row.lease_owner, row.next_try_at) == (1, None, None)
        else:  # the output loop's download, after the terminal write
            assert row.stored_at > task.completed_at and row.attempts == 1


async def _stored_view(gw: Any, task_id: str) -> bool:
    outputs = (await gw.client().get(f"/v1/tasks/{task_id}")).json()["outputs"]
    return bool(outputs) and outputs[0]["sha256"] is not None


async def test_outputs_not_stored_in_time_are_left_to_the_output_loop(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    good = png()
    image = {"content-type": "image/png"}
    async with (
        serve_receiver() as cdn,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            output_hosts="127.0.0.1",
            output_copy_first_s=0.5,
            output_retry_s="0.1,0.1",
        ) as gw,
    ):
        # The copy before the write meets a slow answer and a 503; the loop's first
        # attempts get the image.
        cdn.on("/good.png", default=Answer(200, good, image))
        cdn.on("/slow.png", Answer(200, good, image, delay_s=5), default=Answer(200, good, image))
        cdn.on("/flaky.png", Answer(503), default=Answer(200, good, image))
        names = ("good", "slow", "flaky")
        now = gw.ctx.clock()
        task = task_row(
            Status.running, now=now, upstream_task_id="41", upstream_status="task_start"
        )
        async with unit_of_work(gw.ctx.sm) as s:
            s.add(task)
        detail = {
            "id": "41",
            "status": "task_postprocess_end",
            "pexit": "0",
            "outputs": [
                {
                    "name": f"{n}.png",
                    "contenttype": "image/png",
                    "size": 9,
                    "url": f"{cdn.url}/{n}.png",
                }
                for n in names
            ],
        }
        before = {o: _copied_first(o) for o in ("stored", "deferred")}
        assert (
            await apply_detail(
                gw.ctx, await _task(gw, task.id), UpstreamTask.from_wire(detail), source="poll"
            )
            == Status.succeeded
        )
        assert {o: _copied_first(o) - before[o] for o in before} == {"stored": 1, "deferred": 2}

        rows = await until(lambda: _all_stored(gw, task.id))
        done = await _task(gw, task.id)
        # Only the first was stored by the terminal write; the others by the loop after it,
        # each in its first attempt (the copy's try before the write is not counted).
        assert [r.stored_at == done.completed_at for r in rows] == [True, False, False]
        assert [r.attempts for r in rows] == [1, 1, 1]
        assert done.outputs == [present(r, gw.url) for r in rows]
        assert [c.path for c in cdn.calls].count("/good.png") == 1
        assert [c.path for c in cdn.calls].count("/flaky.png") == 2
        assert [c.path for c in cdn.calls].count("/slow.png") == 2
        for r in rows:
            assert (tmp_path / r.storage_key).read_bytes() == good


async def test_copy_first_waits_at_most_its_time_and_keeps_what_was_stored() -> None:
    """Narrow: the hand-off's ``copy`` stands in for the download; the slow one is
    cancelled at ``copy_s``, the failed one left out, nothing at all with ``copy_s`` 0."""
    started: list[int] = []
    cancelled: list[int] = []

    async def copy(task_id: str, idx: int, url: str) -> Any:
        started.append(idx)
        if url == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(idx)
                raise
        if url == "bad":
            raise OSError("no")
        return f"facts of {idx}"

    class Session:
        pass

    class Maker:
        kw = {"sync_session_class": Session}

    def handoff(copy_s: float, limit: int = 4) -> OutputHandoff:
        return OutputHandoff(
            owner="me",
            lease_s=10,
            accepting=lambda: True,
            hand=lambda _: None,
            copy=copy,
            copy_s=copy_s,
            copy_limit=limit,
        )

    urls = {0: "good", 2: "slow", 3: "bad"}
    Session.hgw_output_handoff = handoff(0.2)  # type: ignore[attr-defined]
    got = await copy_first(Maker(), "t1", urls, crowd=1)  # type: ignore[arg-type]
    assert got == {0: "facts of 0"}
    assert sorted(started) == [0, 2, 3] and cancelled == [2]
    started.clear()
    Session.hgw_output_handoff = handoff(0.0)  # type: ignore[attr-defined]
    assert await copy_first(Maker(), "t1", urls, crowd=1) == {}  # type: ignore[arg-type]
    assert started == []

    # A process working on more than ``copy_limit`` tasks copies nothing (its outputs
    # go to the output loop).
    Session.hgw_output_handoff = handoff(0.3, limit=2)  # type: ignore[attr-defined]
    busy = _copied_first("busy")
    assert await copy_first(Maker(), "t2", {0: "good"}, crowd=3) == {}  # type: ignore[arg-type]
    assert started == [] and _copied_first("busy") == busy + 1
    assert await copy_first(Maker(), "t2", {0: "good"}, crowd=2) == {0: "facts of 0"}  # type: ignore[arg-type]


def test_copies_show_as_a_stored_output() -> None:
    from app.imaging import ImageInfo

    wiro = [
        {"name": n, "content_type": "image/png", "size": 9, "url": u, "upstream_url": u}
        for n, u in (("a.png", "https://cdn/a"), ("b.png", "https://cdn/b"))
    ]
    info = ImageInfo(content_type="image/jpeg", width=3, height=2, size=7, sha256="ab" * 32)
    shown = Copies({1: info}, "https://gw").present("t9", wiro)
    assert shown[0] == wiro[0]
    assert shown[1] == {
        "name": "b.png",
        "content_type": "image/jpeg",
        "size": 7,
        "url": "https://gw/v1/tasks/t9/outputs/1",
        "upstream_url": "https://cdn/b",
        "sha256": "ab" * 32,
        "width": 3,
        "height": 2,
    }


async def test_a_cancel_that_finds_the_task_succeeded_waits_for_no_download(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """``POST /cancel`` reads Detail itself; a success found there is recorded by the
    request, which holds no lease and waits for no download: its output is stored by the
    output loop afterwards."""
    sim.configure(queue_s=0.05, run_s=0.2, callback_drop=1.0)  # no callback, no early poll
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        output_hosts="127.0.0.1",
        poll_initial_s=60,
        poll_max_s=60,
    ) as gw:
        r = await gw.client().post("/v1/tasks", json=task_body(sim, outputFormat="png"))
        task_id, upstream_id = r.json()["id"], r.json()["upstream"]["task_id"]

        async def finished_upstream() -> bool:
            record = httpx.get(f"{sim.url}/__sim/tasks/{upstream_id}").json()
            return record["status"] == "task_postprocess_end"

        await until(finished_upstream)
        r = await gw.client().post(f"/v1/tasks/{task_id}/cancel")
        assert r.status_code < 300 and r.json()["status"] == "succeeded"
        [row] = await until(lambda: _all_stored(gw, task_id))
        task = await _task(gw, task_id)
        events = (await gw.client().get(f"/v1/tasks/{task_id}/events")).json()["data"]
        assert [e["source"] for e in events if e["status"] == "succeeded"] == ["cancel"]
        assert row.stored_at > task.completed_at
        assert task.outputs == [present(row, gw.url)]


async def _all_stored(gw: Any, task_id: str) -> list[Any] | None:
    rows = await outputs_of(gw, task_id)
    return rows if rows and all(r.state == "stored" for r in rows) else None
