"""Erasure: DELETE /v1/tasks/{id}/images removes the stored input and outputs here and
asks Wiro to delete its copies (retried while Wiro is unavailable); the task stays with
``images_erased_at`` and its output URLs answer 410. Retention does it by itself."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import select

from app.lifecycle import Status
from app.models import Erasure, Upload
from app.states import EventKind
from app.wiro import WiroUnavailable
from tests.conftest import Sim, run_gateway, task_body
from tests.receivers import Answer, serve_receiver
from tests.results_helpers import events_of, finished_task, outputs_of, until

PROBLEM = "application/problem+json"


def files_under(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for sub in ("outputs", "uploads")
        if (root / sub).exists()
        for p in (root / sub).rglob("*")
        if p.is_file()
    )


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()


async def erasure_of(gw, task_id: str) -> Erasure | None:
    async with gw.ctx.sm() as s:
        return await s.get(Erasure, task_id)


async def test_erasure_here_and_at_wiro(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, output_hosts="127.0.0.1"
    ) as gw:
        up = await gw.client().post("/v1/uploads", files={"file": ("me.jpg", jpeg(), "image/jpeg")})
        assert up.status_code == 201
        photo = up.json()["url"]
        r = await gw.client().post("/v1/tasks", json=task_body(sim, inputImageUrl=photo))
        task_id = r.json()["id"]
        assert (await gw.wait_terminal(task_id))["status"] == "succeeded"  # Wiro fetched it
        await until(lambda: _stored(gw, task_id))
        task = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
        upstream_url = task["outputs"][0]["upstream_url"]
        assert len(files_under(tmp_path)) == 2  # the output and the upload

        # another client can neither erase nor read it
        assert (await gw.client("beta").delete(f"/v1/tasks/{task_id}/images")).status_code == 404

        r = await gw.client().delete(f"/v1/tasks/{task_id}/images")
        assert r.status_code == 204 and r.content == b""
        assert files_under(tmp_path) == []
        assert sim.stats()["delete_calls"] == 1
        assert httpx.get(upstream_url).status_code == 404  # Wiro's copy is gone too
        async with httpx.AsyncClient() as anon:
            assert (await anon.get(photo)).status_code == 404

        after = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
        assert after["status"] == "succeeded" and after["images_erased_at"]
        r = await gw.client().get(after["outputs"][0]["url"])
        assert r.status_code == 410 and r.headers["content-type"].startswith(PROBLEM)
        assert (await gw.client("beta").get(after["outputs"][0]["url"])).status_code == 404
        e = await erasure_of(gw, task_id)
        assert e is not None and e.upstream_state == "done" and e.done_at is not None
        async with gw.ctx.sm() as s:
            [row] = (await s.scalars(select(Upload))).all()
        assert row.erased_at is not None
        assert e.reason == "request"
        kinds = [ev.kind for ev in await events_of(gw, task_id, "api")]
        assert kinds == [EventKind.created, EventKind.images_erased, EventKind.upstream_erased]

        # again: nothing more to do, nothing more done
        assert (await gw.client().delete(f"/v1/tasks/{task_id}/images")).status_code == 204
        assert sim.stats()["delete_calls"] == 1
        assert (await gw.client().get(f"/v1/tasks/{task_id}")).json()["images_erased_at"] == after[
            "images_erased_at"
        ]


async def _stored(gw, task_id: str) -> bool:
    rows = await outputs_of(gw, task_id)
    return bool(rows) and all(o.state == "stored" for o in rows)


class FlakyWiro:
    """Wiro's InputOutputDelete, unavailable the first ``failures`` times."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, []

    async def input_output_delete(self, task_token: str) -> None:
        self.calls.append(task_token)
        if len(self.calls) <= self.failures:
            raise WiroUnavailable("/Task/InputOutputDelete: HTTP 503", http_status=503)


async def test_erasure_is_retried_while_wiro_is_unavailable(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, erase_retry_s="0.1,0.1,0.1"
    ) as gw:
        wiro = FlakyWiro(failures=2)
        gw.ctx.wiro = wiro  # only erasure talks to Wiro in this test
        task_id = await finished_task(gw, status=Status.failed, upstream_token="tok-1")
        assert (await gw.client().delete(f"/v1/tasks/{task_id}/images")).status_code == 204

        async def done() -> Erasure | None:
            e = await erasure_of(gw, task_id)
            return e if e is not None and e.upstream_state == "done" else None

        e = await until(done)
        assert e.attempts == 3 and wiro.calls == ["tok-1"] * 3 and e.last_error is None
        # one event for the first failure (not one per retry), one for the end
        kinds = [ev.kind for ev in await events_of(gw, task_id, "api")]
        assert kinds == [
            EventKind.images_erased,
            EventKind.upstream_erase_retry,
            EventKind.upstream_erased,
        ]

        # a task that never reached Wiro has nothing to delete there
        local = await finished_task(gw, status=Status.cancelled, upstream_token=None)
        assert (await gw.client().delete(f"/v1/tasks/{local}/images")).status_code == 204
        e = await erasure_of(gw, local)
        assert e is not None and e.upstream_state == "skipped" and e.done_at is not None
        assert wiro.calls == ["tok-1"] * 3

        # a task still running cannot be erased yet; unknown tasks are 404
        r = await gw.client().post("/v1/tasks", json=task_body(sim))
        running = r.json()["id"]
        r = await gw.client().delete(f"/v1/tasks/{running}/images")
        assert r.status_code == 409 and r.headers["content-type"].startswith(PROBLEM)
        assert (await gw.client().delete("/v1/tasks/tsk_nope/images")).status_code == 404


async def test_retention_erases_by_itself(db_url: str, sim: Sim, tmp_path: Path) -> None:
    good = jpeg()
    async with (
        serve_receiver() as cdn,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            output_hosts="127.0.0.1",
            retention_days=3 / 86400,
            retention_sweep_s=0.2,
        ) as gw,
    ):
        cdn.on("/0.jpg", default=Answer(200, good, {"content-type": "image/jpeg"}))
        up = await gw.client().post("/v1/uploads", files={"file": ("me.jpg", good, "image/jpeg")})
        photo = up.json()["url"]
        spare = (
            await gw.client().post("/v1/uploads", files={"file": ("b.jpg", good, "image/jpeg")})
        ).json()
        task_id = await finished_task(
            gw,
            status=Status.succeeded,
            input_url=photo,
            outputs=[{"name": "0.jpg", "content_type": "image/jpeg", "url": f"{cdn.url}/0.jpg"}],
        )
        # No look at the files in between: on a busy machine the sweep may already have
        # erased the uploads (3 s old) by the time the output is stored.

        async def erased() -> bool:
            t = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
            return bool(t["images_erased_at"]) and not files_under(tmp_path)

        await until(erased, timeout=20)
        assert (await gw.client().get(f"/v1/tasks/{task_id}/outputs/0")).status_code == 410
        async with httpx.AsyncClient() as anon:
            assert (await anon.get(photo)).status_code == 404
            assert (await anon.get(spare["url"])).status_code == 404  # used by no task
        e = await erasure_of(gw, task_id)
        assert e is not None and e.reason == "retention"
        # The output had been stored, then erased (``stored_at`` stays).
        (out,) = await outputs_of(gw, task_id)
        assert out.state == "erased" and out.stored_at is not None
        assert out.stored_at <= e.requested_at and out.storage_key in e.keys
        assert [ev.kind for ev in await events_of(gw, task_id, "api")].count(
            EventKind.images_erased
        ) == 1
