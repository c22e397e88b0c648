"""Durable outputs: the gateway keeps its own copy of each output, serves it under the
task's auth after Wiro's URL is gone, and a download that fails never fails the task."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from app.lifecycle import Status
from app.models import Task
from tests.conftest import Sim, run_gateway, task_body
from tests.receivers import Answer, serve_receiver
from tests.results_helpers import finished_task, outputs_of, until


def png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


async def test_outputs_outlive_the_upstream_copy(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, output_hosts="127.0.0.1"
    ) as gw:
        r = await gw.client().post("/v1/tasks", json=task_body(sim, outputFormat="png"))
        task_id = r.json()["id"]
        await gw.wait_terminal(task_id)

        async def stored() -> dict | None:
            t = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
            return t if t["outputs"] and t["outputs"][0]["sha256"] else None

        task = await until(stored)
        assert task["status"] == "succeeded"
        [out] = task["outputs"]
        assert out["url"] == f"{gw.url}/v1/tasks/{task_id}/outputs/0"
        assert out["upstream_url"].startswith(f"{sim.url}/cdn/")
        assert out["content_type"] == "image/png" and out["size"] > 0

        # Wiro forgets its copy (as it does after a while)...
        async with gw.ctx.sm() as s:
            token = await s.scalar(select(Task.upstream_token).where(Task.id == task_id))
        await gw.ctx.wiro.input_output_delete(token)
        assert httpx.get(out["upstream_url"]).status_code == 404

        # ...and the gateway still has it, intact.
        r = await gw.client().get(f"/v1/tasks/{task_id}/outputs/0")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert hashlib.sha256(r.content).hexdigest() == out["sha256"]
        assert len(r.content) == out["size"]
        im = Image.open(io.BytesIO(r.content))
        assert (im.width, im.height) == (out["width"], out["height"])
        assert (tmp_path / "outputs" / task_id / "0").read_bytes() == r.content
        assert r.headers["etag"] == f'"{out["sha256"]}"'
        again = await gw.client().get(
            f"/v1/tasks/{task_id}/outputs/0", headers={"if-none-match": r.headers["etag"]}
        )
        assert again.status_code == 304 and again.content == b""

        # same scoping as the task
        assert (await gw.client("beta").get(f"/v1/tasks/{task_id}/outputs/0")).status_code == 404
        assert (await gw.client("root").get(f"/v1/tasks/{task_id}/outputs/0")).status_code == 200
        async with httpx.AsyncClient(base_url=gw.url) as anon:
            assert (await anon.get(f"/v1/tasks/{task_id}/outputs/0")).status_code == 401
        r = await gw.client().get(f"/v1/tasks/{task_id}/outputs/1")
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("in_child", [True, False], ids=["output-process", "in-process"])
async def test_downloads_are_checked_retried_and_never_fail_the_task(
    db_url: str, sim: Sim, tmp_path: Path, in_child: bool
) -> None:
    """The same outcomes whether the attempts run in the output process (the default) or
    on the replica's own threads (``GATEWAY_OUTPUT_PROCESS=false``)."""
    good = png()
    async with (
        serve_receiver() as cdn,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            output_hosts="127.0.0.1",
            output_max_bytes=20_000,
            output_retry_s="0.1,0.1",
            output_process=in_child,
        ) as gw,
    ):
        port = cdn.url.rsplit(":", 1)[1]
        cdn.on("/flaky.png", Answer(503), default=Answer(200, good, {"content-type": "image/png"}))
        cdn.on("/page.png", default=Answer(200, b"<html>", {"content-type": "text/html"}))
        cdn.on("/broken.png", default=Answer(200, good[:60], {"content-type": "image/png"}))
        cdn.on(
            "/huge.png",
            default=Answer(200, b"\x89PNG" + b"0" * 30_000, {"content-type": "image/png"}),
        )
        cdn.on("/moved.png", default=Answer(302, headers={"location": f"{cdn.url}/flaky.png"}))
        cases = {
            "flaky": f"{cdn.url}/flaky.png",
            "page": f"{cdn.url}/page.png",
            "broken": f"{cdn.url}/broken.png",
            "huge": f"{cdn.url}/huge.png",
            "moved": f"{cdn.url}/moved.png",
            "host": f"http://localhost:{port}/flaky.png",  # not in GATEWAY_OUTPUT_HOSTS
        }
        ids = {
            name: await finished_task(
                gw,
                status=Status.succeeded,
                outputs=[
                    {
                        "name": "0.png",
                        "content_type": "image/png",
                        "size": 1,
                        "url": url,
                        "upstream_url": url,
                    }
                ],
            )
            for name, url in cases.items()
        }

        async def all_settled() -> bool:
            rows = [o for t in ids.values() for o in await outputs_of(gw, t)]
            return all(o.state != "pending" for o in rows)

        await until(all_settled)
        child = gw.app.state.services.output_process
        assert (child is not None and child.started == 1) if in_child else child is None
        rows = {name: (await outputs_of(gw, t))[0] for name, t in ids.items()}
        assert rows["flaky"].state == "stored" and rows["flaky"].attempts == 2
        assert rows["flaky"].sha256 == hashlib.sha256(good).hexdigest()
        assert (rows["flaky"].width, rows["flaky"].height) == (40, 30)
        expected = {
            "page": "content type",
            "broken": "decoded",
            "huge": "cap",
            "moved": "redirect",
            "host": "allowlist",
        }
        for name, words in expected.items():
            assert rows[name].state == "failed", name
            assert rows[name].attempts == 1, (name, rows[name].error)  # no point retrying
            assert words in (rows[name].error or ""), (name, rows[name].error)
        assert not [c for c in cdn.calls if c.headers.get("host", "").startswith("localhost")]

        for name, task_id in ids.items():
            task = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
            assert task["status"] == "succeeded"
            [out] = task["outputs"]
            if name == "flaky":
                assert out["url"].startswith(gw.url) and out["sha256"]
            else:  # not stored: the upstream URL stays the one to use
                assert out["url"] == cases[name] and out["sha256"] is None
                r = await gw.client().get(f"/v1/tasks/{task_id}/outputs/0")
                assert r.status_code == 404 and "not stored" in r.json()["detail"]
        stored_files = sorted(
            p.relative_to(tmp_path).as_posix()
            for p in (tmp_path / "outputs").rglob("*")
            if p.is_file()
        )
        assert stored_files == [f"outputs/{ids['flaky']}/0"]
