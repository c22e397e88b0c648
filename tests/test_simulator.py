"""The simulator in-process (httpx.ASGITransport); its outbound HTTP (callbacks, input
downloads) goes to an httpx.MockTransport that records callbacks and serves test images.
One test runs it under real uvicorn, for the connection-drop fault."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvicorn
from PIL import Image

from app.api.direct import DirectRoute
from app.simulator import SimConfig, create_sim_app
from app.wiro.signing import NonceSource, sign
from tests.procs import free_port

BASE = "http://sim.test"
KEY, SECRET = "test-key", "test-secret"
RUN = "/v1/Run/wiro/professional-headshot"
FIXTURES = Path(__file__).parent / "fixtures" / "wiro"
STAGE_ORDER = [  # Wiro's documented order; task_error (when shown) after task_start
    "task_queue", "task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign",
    "task_start", "task_error", "task_output", "task_output_full", "task_end",
    "task_postprocess_start", "task_postprocess_end",
]  # fmt: skip


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


AUTH_ERROR = fixture("run_error_auth")  # "Project authorization is not valid."
NOT_FOUNDED = {
    "result": False,
    "errors": [{"code": 0, "message": "Project authorization is not founded."}],
}
# Wiro's documented answers (also in ../shared/fixtures/wiro/, newer than tests/fixtures/).
PARSING_URL = {"result": False, "errors": [{"code": 0, "message": "Error parsing url."}]}
SERVER_ERROR = {
    "result": False,
    "errors": [{"code": 0, "message": "Internal server error, please try again."}],
}
TASK_NOT_EXIST = {"result": False, "errors": [{"code": 1, "message": "task-not-exist"}]}


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Harness:
    app: Any
    client: httpx.AsyncClient
    callbacks: list[httpx.Request]
    callback_codes: dict[str, list[int]]  # receiver's answers per callback path, in order
    nonces: NonceSource = field(default_factory=NonceSource)

    def headers(self, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
        nonce = str(self.nonces.next())
        return {"x-api-key": key, "x-nonce": nonce, "x-signature": sign(key, secret, nonce)}

    async def wiro(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(f"/v1/{path}", json=body or {}, headers=self.headers())

    async def run(self, **params: Any) -> httpx.Response:
        body = {"inputImageUrl": f"{BASE}/samples/portrait.jpg", **params}
        return await self.client.post(RUN, json=body, headers=self.headers())

    async def run_ok(self, **params: Any) -> str:
        r = await self.run(**params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["result"] is True, body
        return body["taskid"]

    async def detail(self, taskid: str) -> dict[str, Any]:
        body = (await self.wiro("Task/Detail", {"taskid": taskid})).json()
        assert body["result"] is True, body
        return body["tasklist"][0]

    async def wait_status(
        self, taskid: str, until: Callable[[str], bool], timeout: float = 5.0
    ) -> tuple[dict[str, Any], list[str]]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            task = await self.detail(taskid)
            if not seen or seen[-1] != task["status"]:
                seen.append(task["status"])
            if until(task["status"]):
                return task, seen
            assert time.monotonic() < deadline, f"{taskid} stuck in {seen}"
            await asyncio.sleep(0.01)

    async def wait_terminal(self, taskid: str) -> tuple[dict[str, Any], list[str]]:
        return await self.wait_status(
            taskid, lambda s: s in ("task_postprocess_end", "task_cancel")
        )

    async def configure(self, **knobs: Any) -> dict[str, Any]:
        r = await self.client.patch("/__sim/config", json=knobs)
        assert r.status_code == 200, r.text
        return r.json()

    async def stats(self) -> dict[str, Any]:
        return (await self.client.get("/__sim/stats")).json()

    async def wait_callbacks(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.callbacks) < n:
            assert time.monotonic() < deadline, f"{len(self.callbacks)} callbacks, wanted {n}"
            await asyncio.sleep(0.01)
        return [json.loads(r.content) for r in self.callbacks]

    async def record(self, taskid: str) -> dict[str, Any]:
        r = await self.client.get(f"/__sim/tasks/{taskid}")
        assert r.status_code == 200, r.text
        return r.json()

    async def wait_stats(
        self, cond: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """The simulator's counters, once ``cond`` holds for them."""
        deadline = time.monotonic() + timeout
        while not cond(stats := await self.stats()):
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.01)
        return stats

    async def past_plan(self, taskid: str, timeout: float = 5.0) -> dict[str, Any]:
        """The task's record once the simulator's own clock is past every stage it planned
        for it (its walk is over: whatever it shows now, it shows for good)."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.record(taskid)
            if record["age_s"] > max(record["timeline"].values(), default=0.0):
                return record
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.01)

    async def history(self, taskid: str) -> list[str]:
        """The stages the simulator says the task went through, in order."""
        return [h["status"] for h in (await self.record(taskid))["history"]]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    callbacks: list[httpx.Request] = []
    codes: dict[str, list[int]] = {}

    async def outbound(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gw.test":
            callbacks.append(request)
            planned = codes.get(request.url.path)
            return httpx.Response(planned.pop(0) if planned else 204)
        if request.url.host == "img.test":
            if request.url.path == "/wide.png":
                return httpx.Response(200, content=png_bytes((300, 200)))
            if request.url.path == "/broken.jpg":
                return httpx.Response(200, content=b"\xff\xd8 definitely not a jpeg")
        return httpx.Response(404)

    config = SimConfig(
        api_key=KEY, api_secret=SECRET, public_url=BASE, queue_s=0.1, run_s=0.3,
        callback_retries=0,
    )  # fmt: skip
    outbound_client = httpx.AsyncClient(transport=httpx.MockTransport(outbound))
    app = create_sim_app(config, http_client=outbound_client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield Harness(app, client, callbacks, codes)
    await app.state.sim.aclose()
    await outbound_client.aclose()


def callback_url(gateway_task: str = "tsk_01") -> str:
    return f"http://gw.test/callbacks/wiro/{gateway_task}/secret-token"


# -- auth ---------------------------------------------------------------------------------


def test_published_signature_vector() -> None:
    expected = "4e67485ace9c18196d65275b4f42c54c0b84aee6750ba6a6a78de9ac4227ac9e"
    assert sign("test-api-key", "test-api-secret", "1734513807") == expected


async def test_signature_accepted_and_rejected(harness: Harness) -> None:
    h = harness
    assert (await h.wiro("Task/List")).json()["result"] is True

    bad = h.headers() | {"x-signature": "0" * 64}
    r = await h.client.post("/v1/Task/List", json={}, headers=bad)
    assert (r.status_code, r.json()) == (401, AUTH_ERROR)

    r = await h.client.post(RUN, json={"inputImageUrl": "x"}, headers=h.headers(secret="x"))
    assert (r.status_code, r.json()) == (401, AUTH_ERROR)
    for headers in (h.headers(key="other-key"), {}):
        r = await h.client.post(RUN, json={"inputImageUrl": "x"}, headers=headers)
        assert (r.status_code, r.json()) == (401, NOT_FOUNDED)
    # signature mode: a bare key is not enough
    r = await h.client.post(RUN, json={"inputImageUrl": "x"}, headers={"x-api-key": KEY})
    assert r.status_code == 401
    (error,) = r.json()["errors"]
    assert error["code"] == 0
    assert error["message"].startswith("Project requires signature authentication.")
    stats = await h.stats()
    assert (stats["runs"], stats["auth_failures"]) == (0, 5)


async def test_published_vector_accepted_by_simulator() -> None:
    app = create_sim_app(
        SimConfig(api_key="test-api-key", api_secret="test-api-secret", public_url=BASE)
    )
    headers = {
        "x-api-key": "test-api-key",
        "x-nonce": "1734513807",
        "x-signature": "4e67485ace9c18196d65275b4f42c54c0b84aee6750ba6a6a78de9ac4227ac9e",
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.post("/v1/Task/List", json={}, headers=headers)
    assert r.json()["result"] is True


async def test_key_only_mode(harness: Harness) -> None:
    h = harness
    config = await h.configure(api_secret="")
    assert config["api_secret"] == ""
    r = await h.client.post("/v1/Task/List", json={}, headers={"x-api-key": KEY})
    assert r.json()["result"] is True
    r = await h.client.post("/v1/Task/List", json={}, headers={"x-api-key": "nope"})
    assert (r.status_code, r.json()) == (401, NOT_FOUNDED)


async def test_sign_not_required_accepts_bare_key_but_checks_given_signature(
    harness: Harness,
) -> None:
    h = harness
    await h.configure(sign_required=False)
    r = await h.client.post("/v1/Task/List", json={}, headers={"x-api-key": KEY})
    assert r.json()["result"] is True
    r = await h.client.post("/v1/Task/List", json={}, headers=h.headers(secret="wrong"))
    assert r.status_code == 401


async def test_nonce_reuse_rejected(harness: Harness) -> None:
    h = harness
    headers = h.headers()
    assert (await h.client.post("/v1/Task/List", json={}, headers=headers)).status_code == 200
    r = await h.client.post("/v1/Task/List", json={}, headers=headers)
    assert (r.status_code, r.json()) == (401, AUTH_ERROR)

    await h.configure(nonce_reuse_rejected=False)
    assert (await h.client.post("/v1/Task/List", json={}, headers=headers)).status_code == 200


# -- the walk and the output ----------------------------------------------------------------


async def test_full_walk_to_success_with_real_png(harness: Harness) -> None:
    h = harness
    r = await h.run(aspectRatio="16:9", outputFormat="png", background="office", seed=7)
    body = r.json()
    assert list(body) == ["errors", "taskid", "socketaccesstoken", "result"]
    assert re.fullmatch(r"[A-Za-z0-9]{30}", body["socketaccesstoken"])

    task, seen = await h.wait_terminal(body["taskid"])
    assert seen == sorted(seen, key=STAGE_ORDER.index), seen  # no poll saw it go back
    # What a poll catches depends on the machine's load; the simulator's own record does not.
    history = await h.history(body["taskid"])
    assert history == [s for s in STAGE_ORDER if s != "task_error"], history
    assert set(seen) <= set(history), (seen, history)
    assert task["status"] == "task_postprocess_end"
    assert task["pexit"] == "0"
    assert task["parameters"] == {
        "inputImageUrl": f"{BASE}/samples/portrait.jpg", "background": "office",
        "safetyTolerance": "2", "aspectRatio": "16:9", "seed": "7", "outputFormat": "png",
    }  # fmt: skip
    assert re.fullmatch(r"0\.\d{12}", task["totalcost"]) and float(task["totalcost"]) > 0
    assert float(task["elapsedseconds"]) >= 0.3
    assert int(task["postprocessendtime"]) >= int(task["createtime"]) > 0

    sample = fixture("detail_succeeded")["tasklist"][0]
    assert list(task) == list(sample)
    assert list(task["outputs"][0]) == list(sample["outputs"][0])
    for key, value in task.items():  # string-typed exactly where Wiro's values are
        assert type(value) is type(sample[key]), key
    for key, value in task["outputs"][0].items():
        assert type(value) is type(sample["outputs"][0][key]), key

    (output,) = task["outputs"]
    assert (output["name"], output["contenttype"]) == ("0.png", "image/png")
    assert output["url"].startswith(f"{BASE}/cdn/")
    image_response = await h.client.get(output["url"])
    assert image_response.headers["content-type"] == "image/png"
    assert int(output["size"]) == len(image_response.content) == int(task["size"])
    image = Image.open(io.BytesIO(image_response.content))
    image.load()
    assert image.format == "PNG"
    assert max(image.size) <= 512
    assert image.width / image.height == pytest.approx(16 / 9, rel=0.01)

    by_token = (await h.wiro("Task/Detail", {"tasktoken": body["socketaccesstoken"]})).json()
    assert by_token["total"] == "1" and by_token["tasklist"][0]["id"] == body["taskid"]


async def test_external_input_keeps_its_ratio_as_jpeg(harness: Harness) -> None:
    h = harness
    taskid = await h.run_ok(inputImageUrl="http://img.test/wide.png", background="white")
    task, _ = await h.wait_terminal(taskid)
    assert task["pexit"] == "0"
    (output,) = task["outputs"]
    assert (output["name"], output["contenttype"]) == ("0.jpeg", "image/jpeg")
    image = Image.open(io.BytesIO((await h.client.get(output["url"])).content))
    assert image.format == "JPEG"
    assert image.size == (300, 200)


async def test_upload_then_run_on_the_uploaded_file(harness: Harness) -> None:
    h = harness
    files = {"file": ("me photo.png", png_bytes((200, 400)), "image/png")}
    r = await h.client.post("/v1/File/Upload", files=files, headers=h.headers())
    body = r.json()
    assert body["result"] is True and body["errors"] == []
    (item,) = body["list"]
    assert list(item) == ["id", "name", "contenttype", "size", "url"]
    assert item["url"].startswith(f"{BASE}/files/") and item["name"] == "me_photo.png"
    served = await h.client.get(item["url"])
    assert served.status_code == 200 and len(served.content) == int(item["size"])

    taskid = await h.run_ok(inputImageUrl=item["url"], aspectRatio="1:1")
    task, _ = await h.wait_terminal(taskid)
    image = Image.open(io.BytesIO((await h.client.get(task["outputs"][0]["url"])).content))
    assert image.size == (200, 200)

    no_file = await h.client.post("/v1/File/Upload", data={"x": "1"}, headers=h.headers())
    assert no_file.json()["result"] is False


async def test_form_bodies_are_accepted(harness: Harness) -> None:
    h = harness
    fields = {"inputImageUrl": f"{BASE}/samples/portrait.jpg", "outputFormat": "png"}
    r = await h.client.post(RUN, data=fields, files={"unused": ("a", b"b")}, headers=h.headers())
    taskid = r.json()["taskid"]
    r = await h.client.post("/v1/Task/Detail", data={"taskid": taskid}, headers=h.headers())
    assert r.json()["tasklist"][0]["parameters"]["outputFormat"] == "png"


# -- failures -------------------------------------------------------------------------------


async def test_fail_rate_ends_with_pexit_1(harness: Harness) -> None:
    h = harness
    await h.configure(fail_rate=1.0)
    task, _ = await h.wait_terminal(await h.run_ok())
    assert task["status"] == "task_postprocess_end"
    assert (task["pexit"], task["totalcost"], task["outputs"], task["size"]) == ("1", "0", [], "0")
    assert task["debugerror"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [("http://img.test/broken.jpg", "decode"), ("http://img.test/missing.jpg", "HTTP 404")],
)
async def test_bad_input_fails_the_task(harness: Harness, url: str, reason: str) -> None:
    task, _ = await harness.wait_terminal(await harness.run_ok(inputImageUrl=url))
    assert task["pexit"] == "1" and task["outputs"] == []
    assert reason in task["debugerror"]


async def test_lost_task_is_never_found(harness: Harness) -> None:
    h = harness
    await h.configure(lost_rate=1.0)
    taskid = await h.run_ok(callbackUrl=callback_url())
    await h.past_plan(taskid)
    r = await h.wiro("Task/Detail", {"taskid": taskid})
    expected = fixture("detail_not_found")
    assert (r.status_code, r.json()) == (200, expected)
    assert h.callbacks == []
    stats = await h.stats()
    assert stats["runs"] == 1 and stats["status_counts"] == {"lost": 1}


async def test_transient_task_error_then_success(harness: Harness) -> None:
    """task_error is interim: shown task_error_s after task_start, then the walk goes on.
    Judged on the simulator's recorded history (a poll can miss a 0.2 s stage)."""
    h = harness
    await h.configure(task_error_s=0.2)
    taskid = await h.run_ok()
    task, _ = await h.wait_terminal(taskid)
    assert task["pexit"] == "0" and task["outputs"]
    history = await h.history(taskid)
    assert history == STAGE_ORDER, history
    record = await h.record(taskid)
    after = {e["status"]: e["after_s"] for e in record["history"]}
    assert after["task_output"] - after["task_error"] == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("knob", ["task_error_fatal_rate", "task_error_stuck_rate"])
async def test_stuck_task_error_stays_until_killed(harness: Harness, knob: str) -> None:
    h = harness
    await h.configure(**{knob: 1.0})
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_stuck"))
    task, _ = await h.wait_status(taskid, lambda s: s == "task_error")
    assert task["debugerror"] and task["outputs"] == []
    await h.past_plan(taskid)
    assert (await h.detail(taskid))["status"] == "task_error"
    assert (await h.stats())["callbacks_sent"] == 0  # it never ended by itself
    # A stuck task is past the queue: Cancel refuses, Kill (here by its token) stops it.
    refused = (await h.wiro("Task/Cancel", {"taskid": taskid})).json()
    assert refused == fixture("cancel_not_cancellable")
    killed = (await h.wiro("Task/Kill", {"socketaccesstoken": task["socketaccesstoken"]})).json()
    assert killed["tasklist"][0]["status"] == "task_cancel"
    assert killed["tasklist"][0]["totalcost"] == "0"
    history = await h.history(taskid)
    assert history[-2:] == ["task_error", "task_cancel"]
    assert "task_output" not in history
    (callback,) = await h.wait_callbacks(1)
    assert callback["status"] == "task_cancel"
    stats = await h.stats()
    assert stats["stopped_by_gateway_task"] == {"tsk_stuck": 1}
    assert stats["billable_by_gateway_task"] == {"tsk_stuck": 0}


# -- cancel and kill ------------------------------------------------------------------------


async def test_cancel_while_queued(harness: Harness) -> None:
    h = harness
    await h.configure(queue_s=5.0)
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_cancel"))
    r = (await h.wiro("Task/Cancel", {"taskid": taskid})).json()
    assert list(r) == ["errors", "tasklist", "result"] and r["result"] is True
    task = r["tasklist"][0]
    assert task["status"] == "task_cancel"
    assert (task["totalcost"], task["pexit"], task["assigntime"]) == ("0", "", "0")
    assert task["canceltime"] != "0"
    assert (await h.detail(taskid))["status"] == "task_cancel"

    (callback,) = await h.wait_callbacks(1)
    assert callback["status"] == "task_cancel"
    stats = await h.stats()
    assert stats["runs_by_gateway_task"] == {"tsk_cancel": 1}
    assert stats["billable_by_gateway_task"] == {"tsk_cancel": 0}
    assert stats["cancel_calls"] == 1

    again = (await h.wiro("Task/Kill", {"taskid": taskid})).json()
    assert again == fixture("kill_failed")


async def test_kill_while_running_costs_nothing(harness: Harness) -> None:
    h = harness
    await h.configure(queue_s=0.05, run_s=3.0)  # task_start .. task_output_full: 0.95-1.85 s
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_kill"))
    await h.wait_status(taskid, lambda s: s in ("task_start", "task_output", "task_output_full"))

    refused = (await h.wiro("Task/Cancel", {"taskid": taskid})).json()
    assert refused == fixture("cancel_not_cancellable")

    r = (await h.wiro("Task/Kill", {"taskid": taskid})).json()
    task = r["tasklist"][0]
    assert task["status"] == "task_cancel" and task["outputs"] == []
    assert task["totalcost"] == "0" and float(task["elapsedseconds"]) > 0  # pricing page
    assert task["endtime"] == "0" and task["starttime"] != "0"
    (callback,) = await h.wait_callbacks(1)
    assert callback == task
    stats = await h.stats()
    assert stats["billable_by_gateway_task"] == {"tsk_kill": 0} and stats["kill_calls"] == 1
    assert stats["stopped_by_gateway_task"] == {"tsk_kill": 1}


async def test_kill_refused_when_queued_or_finished(harness: Harness) -> None:
    h = harness
    taskid = await h.run_ok()
    queued = (await h.wiro("Task/Kill", {"taskid": taskid})).json()
    assert queued == fixture("kill_failed")
    await h.wait_terminal(taskid)
    done = (await h.wiro("Task/Kill", {"taskid": taskid})).json()
    assert done["result"] is False and done["errors"][0]["code"] == 1
    late_cancel = (await h.wiro("Task/Cancel", {"taskid": taskid})).json()
    assert late_cancel["errors"][0]["message"] == "Task is not in a cancellable state."
    unknown = (await h.wiro("Task/Cancel", {"taskid": "1"})).json()
    assert unknown["errors"][0] == {"code": 1, "message": "There is no task yet."}


# -- Run rejections -------------------------------------------------------------------------


async def test_concurrency_limit_code_96(harness: Harness) -> None:
    h = harness
    await h.configure(max_concurrency=1)
    first = await h.run_ok()
    r = await h.run()
    assert r.status_code == 200
    (error,) = r.json()["errors"]
    assert error["code"] == 96 and "concurrent task limit" in error["message"]
    assert r.json()["result"] is False
    await h.wait_terminal(first)
    await h.run_ok()  # a slot is free again


async def test_balance_exhausted_code_97(harness: Harness) -> None:
    await harness.configure(balance_exhausted=True)
    r = await harness.run()
    assert r.json() == fixture("run_error_balance_97")
    assert (await harness.stats())["runs"] == 0


async def test_rate_limited_429_with_retry_after(harness: Harness) -> None:
    h = harness
    await h.configure(run_429_rate=1.0)
    r = await h.run()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["result"] is False
    await h.configure(run_429_rate=0.0, run_5xx_rate=1.0)
    r = await h.run()
    assert r.status_code == 500 and r.json()["result"] is False
    assert (await h.stats())["runs"] == 0


async def test_detail_5xx(harness: Harness) -> None:
    h = harness
    taskid = await h.run_ok()
    await h.configure(detail_5xx_rate=1.0)
    r = await h.wiro("Task/Detail", {"taskid": taskid})
    assert r.status_code == 500 and r.json()["result"] is False


async def test_rates_are_drawn_from_the_seed(harness: Harness) -> None:
    h = harness

    async def outcomes() -> list[int]:
        await h.client.post("/__sim/reset")
        return [(await h.run()).status_code for _ in range(12)]

    await h.configure(run_429_rate=0.5, seed=11)
    first = await outcomes()
    assert set(first) == {200, 429}
    assert await outcomes() == first


INVALID = "Request parameters are invalid."


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"inputImageUrl": ""}, "Request parameter [inputImageUrl] required"),
        ({"background": "beach"}, INVALID),
        ({"aspectRatio": "7:5"}, INVALID),
        ({"outputFormat": "webp"}, INVALID),
        ({"safetyTolerance": "6"}, INVALID),  # in range, not an option of the select
        ({"safetyTolerance": "9"}, "Request parameter [safetyTolerance] must be between 0 and 6"),
        (
            {"safetyTolerance": "lax"},
            "Request parameter [safetyTolerance] must be integer or float",
        ),
        ({"seed": "forty-two"}, "Request parameter [seed] must be integer or float"),
        ({"callbackUrl": "http://u:p@gw.test/x"}, INVALID),
    ],
)
async def test_run_validation(harness: Harness, params: dict[str, str], message: str) -> None:
    r = await harness.run(**params)
    assert r.status_code == 200
    assert r.json() == {"result": False, "errors": [{"code": 0, "message": message}]}


async def test_other_models_are_not_found(harness: Harness) -> None:
    h = harness
    r = await h.client.post(
        "/v1/Run/wiro/other-model", json={"inputImageUrl": "x"}, headers=h.headers()
    )
    assert r.json()["result"] is False and r.json()["errors"][0]["code"] == 1


async def test_run_hang_creates_the_task_before_answering(harness: Harness) -> None:
    h = harness
    await h.configure(run_hang_s=0.3)
    started = time.monotonic()
    pending = asyncio.create_task(h.run())
    await h.wait_stats(lambda st: st["runs"] == 1)
    assert not pending.done()
    r = await pending
    assert r.json()["result"] is True and time.monotonic() - started >= 0.3


async def test_run_drop_connection_over_real_http() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = SimConfig(api_key=KEY, api_secret=SECRET, public_url=url, run_drop_connection=True)
    server = uvicorn.Server(
        uvicorn.Config(create_sim_app(config), host="127.0.0.1", port=port, log_level="critical")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done()
            await asyncio.sleep(0.01)
        nonce = str(NonceSource().next())
        headers = {"x-api-key": KEY, "x-nonce": nonce, "x-signature": sign(KEY, SECRET, nonce)}
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            with pytest.raises(httpx.TransportError):
                await client.post(RUN, json={"inputImageUrl": f"{url}/x.jpg"}, headers=headers)
            stats = (await client.get("/__sim/stats")).json()
            sample = await client.get("/samples/portrait.jpg")
        assert stats["runs"] == 1
        image = Image.open(io.BytesIO(sample.content))
        assert image.format == "JPEG" and image.size == (640, 800)
    finally:
        server.should_exit = True
        await serving


# -- callbacks ------------------------------------------------------------------------------


async def test_callbacks_with_duplicates_carry_the_detail_task(harness: Harness) -> None:
    h = harness
    await h.configure(callback_duplicate=2)
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_dup"))
    task, _ = await h.wait_terminal(taskid)
    bodies = await h.wait_callbacks(3)
    # Every copy answered, by the simulator's own ledger, which lists each it sent.
    await h.wait_stats(lambda st: st["callbacks_sent"] == 3)
    assert len((await h.record(taskid))["callbacks"]) == 3
    assert len(h.callbacks) == 3
    assert all(b == task for b in bodies)
    assert all(r.headers["content-type"] == "application/json" for r in h.callbacks)
    assert h.callbacks[0].url.path == "/callbacks/wiro/tsk_dup/secret-token"
    stats = await h.stats()
    assert stats["callbacks_sent"] == 3 and stats["callbacks_failed"] == 0


async def test_callbacks_dropped(harness: Harness) -> None:
    h = harness
    await h.configure(callback_drop=1.0)
    await h.wait_terminal(await h.run_ok(callbackUrl=callback_url()))
    # Once counted as dropped, the simulator has decided: no callback will come.
    stats = await h.wait_stats(lambda st: st["callbacks_dropped"] == 1)
    assert h.callbacks == []
    assert stats["callbacks_sent"] == 0


async def test_callback_retried_then_given_up(harness: Harness) -> None:
    h = harness
    await h.configure(callback_retries=1)
    h.callback_codes["/callbacks/wiro/tsk_a/secret-token"] = [500, 204]  # delivered 2nd time
    h.callback_codes["/callbacks/wiro/tsk_b/secret-token"] = [500, 502]  # never delivered
    await h.run_ok(callbackUrl=callback_url("tsk_a"))
    await h.run_ok(callbackUrl=callback_url("tsk_b"))
    await h.wait_callbacks(4)
    # Both deliveries over (sent or given up), by the simulator's own count.
    stats = await h.wait_stats(lambda st: st["callbacks_sent"] + st["callbacks_failed"] == 2)
    assert (stats["callbacks_sent"], stats["callbacks_failed"]) == (1, 1)
    assert stats["callback_attempts"] == 4


async def test_callback_reorder_sends_a_stale_stage_last(harness: Harness) -> None:
    h = harness
    await h.configure(callback_reorder=True)
    await h.wait_terminal(await h.run_ok(callbackUrl=callback_url()))
    final, stale = await h.wait_callbacks(2)
    assert final["status"] == "task_postprocess_end"
    assert stale["status"] == "task_start" and stale["outputs"] == []


async def test_callback_early_arrives_before_run_answers(harness: Harness) -> None:
    h = harness
    await h.configure(callback_early=True, callback_delay_s=0.05)
    taskid = await h.run_ok(callbackUrl=callback_url())
    assert len(h.callbacks) == 1
    early = json.loads(h.callbacks[0].content)
    assert (early["id"], early["status"]) == (taskid, "task_queue")
    await h.wait_terminal(taskid)
    bodies = await h.wait_callbacks(2)
    assert bodies[1]["status"] == "task_postprocess_end"


# -- outputs, list, control -----------------------------------------------------------------


async def test_output_ttl_expiry(harness: Harness) -> None:
    h = harness
    await h.configure(output_ttl_s=3.0)  # room for a busy machine before the first GET
    task, _ = await h.wait_terminal(await h.run_ok())
    url = task["outputs"][0]["url"]
    assert (await h.client.get(url)).status_code == 200
    deadline = time.monotonic() + 30
    while (status := (await h.client.get(url)).status_code) == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert status == 404  # and it stays gone
    assert (await h.client.get(url)).status_code == 404


async def test_input_output_delete(harness: Harness) -> None:
    h = harness
    taskid = await h.run_ok()
    token = (await h.detail(taskid))["socketaccesstoken"]
    early = (await h.wiro("Task/InputOutputDelete", {"tasktoken": token})).json()
    assert early == {
        "result": False,
        "errors": [
            {"code": 1, "message": "Task must be completed or cancelled before deleting files"}
        ],
    }

    task, _ = await h.wait_terminal(taskid)
    url = task["outputs"][0]["url"]
    assert (await h.client.get(url)).status_code == 200
    r = (await h.wiro("Task/InputOutputDelete", {"tasktoken": token})).json()
    assert r == fixture("input_output_delete_ok")
    assert (await h.client.get(url)).status_code == 404
    again = (await h.wiro("Task/InputOutputDelete", {"tasktoken": token})).json()
    assert again == TASK_NOT_EXIST  # already gone
    unknown = (await h.wiro("Task/InputOutputDelete", {"tasktoken": "nope"})).json()
    assert unknown == TASK_NOT_EXIST


async def test_task_list_newest_first_with_paging(harness: Harness) -> None:
    h = harness
    ids = [await h.run_ok() for _ in range(3)]
    body = (await h.wiro("Task/List", {"start": "0", "limit": "2"})).json()
    assert body["result"] is True and body["total"] == "3"
    assert [t["id"] for t in body["tasklist"]] == ids[::-1][:2]
    rest = (await h.wiro("Task/List", {"start": "2", "limit": "2"})).json()
    assert [t["id"] for t in rest["tasklist"]] == ids[:1]


async def test_control_routes(harness: Harness) -> None:
    h = harness
    config = (await h.client.get("/__sim/config")).json()
    assert config["api_secret"] == "**********" and config["queue_s"] == 0.1
    assert set(config) == set(SimConfig.model_fields)

    updated = await h.configure(fail_rate=0.25, callback_duplicate=1)
    assert (updated["fail_rate"], updated["callback_duplicate"]) == (0.25, 1)
    for bad in ({"fail_rate": 2}, {"no_such_knob": 1}, {"queue_s": "slow"}):
        assert (await h.client.patch("/__sim/config", json=bad)).status_code == 422
    assert (await h.client.get("/__sim/config")).json()["fail_rate"] == 0.25

    await h.configure(fail_rate=0.0)
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_ctl"))
    record = (await h.client.get(f"/__sim/tasks/{taskid}")).json()
    assert record["gateway_task_id"] == "tsk_ctl" and record["fate"] == "ok"
    assert record["detail"]["id"] == taskid
    assert (await h.client.get("/__sim/tasks/nope")).status_code == 404

    assert (await h.client.post("/__sim/reset")).status_code == 200
    stats = await h.stats()
    assert (stats["runs"], stats["runs_by_gateway_task"], stats["status_counts"]) == (0, {}, {})
    assert (await h.wiro("Task/Detail", {"taskid": taskid})).json()["result"] is False
    assert (await h.client.get("/__sim/config")).json()["callback_duplicate"] == 1


async def test_stats_by_gateway_task(harness: Harness) -> None:
    h = harness
    first = await h.run_ok(callbackUrl=callback_url("tsk_twice"))
    second = await h.run_ok(callbackUrl=callback_url("tsk_twice"))
    await h.run_ok(callbackUrl=callback_url("tsk_once"))
    await h.run_ok()  # no callback: no gateway task
    stats = await h.stats()
    assert stats["runs"] == 4
    assert stats["runs_by_gateway_task"] == {"tsk_twice": 2, "tsk_once": 1}
    assert stats["billable_by_gateway_task"] == {"tsk_twice": 0, "tsk_once": 0}  # queued
    for taskid in (first, second):
        await h.wait_terminal(taskid)
    stats = await h.stats()
    assert stats["billable_by_gateway_task"]["tsk_twice"] == 2
    assert stats["status_counts"]["task_postprocess_end"] >= 2
    assert stats["detail_calls"] > 0
    assert set(stats) >= {
        "runs", "runs_by_gateway_task", "billable_by_gateway_task", "detail_calls",
        "cancel_calls", "kill_calls", "callbacks_sent", "callbacks_failed", "status_counts",
    }  # fmt: skip


# -- Wiro's documented shapes and the knobs for what it does not document -----------------


async def test_omit_pexit_leaves_the_key_out_and_outputs_decide(harness: Harness) -> None:
    h = harness
    await h.configure(omit_pexit=True)
    taskid = await h.run_ok()
    task, _ = await h.wait_terminal(taskid)
    assert "pexit" not in task
    assert task["status"] == "task_postprocess_end" and task["outputs"]
    assert float(task["totalcost"]) > 0  # a success is billed, pexit shown or not
    expected = [k for k in fixture("detail_succeeded")["tasklist"][0] if k != "pexit"]
    assert list(task) == expected  # the shape of Wiro's detail_succeeded_no_pexit sample
    listed = (await h.wiro("Task/List", {"limit": "1"})).json()["tasklist"][0]
    assert "pexit" not in listed
    assert "pexit" not in (await h.record(taskid))["detail"]


async def test_failed_and_cancelled_tasks_cost_nothing(harness: Harness) -> None:
    h = harness
    await h.configure(fail_rate=1.0)
    failed, _ = await h.wait_terminal(await h.run_ok(callbackUrl=callback_url("tsk_f")))
    await h.configure(fail_rate=0.0, queue_s=5.0)
    cancelled = await h.run_ok(callbackUrl=callback_url("tsk_c"))
    assert (await h.wiro("Task/Cancel", {"taskid": cancelled})).json()["result"] is True
    await h.configure(queue_s=0.1)
    ok, _ = await h.wait_terminal(await h.run_ok(callbackUrl=callback_url("tsk_ok")))
    assert (failed["pexit"], failed["totalcost"]) == ("1", "0")
    assert (await h.detail(cancelled))["totalcost"] == "0"
    assert ok["pexit"] == "0" and float(ok["totalcost"]) > 0
    stats = await h.stats()
    assert stats["billable_by_gateway_task"] == {"tsk_f": 0, "tsk_c": 0, "tsk_ok": 1}
    assert stats["billable_runs"] == 1


async def test_run_server_error_count_is_deterministic(harness: Harness) -> None:
    h = harness
    await h.configure(run_server_error_count=2)
    for _ in range(2):
        r = await h.run(callbackUrl=callback_url("tsk_srv"))
        assert (r.status_code, r.json()) == (200, SERVER_ERROR)
    assert (await h.client.get("/__sim/config")).json()["run_server_error_count"] == 0
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_srv"))  # then normal
    stats = await h.stats()
    assert (stats["run_server_errors"], stats["run_calls"], stats["tasks_created"]) == (2, 3, 1)
    assert stats["runs_by_gateway_task"] == {"tsk_srv": 1}  # no task for the refused Runs
    assert stats["run_rejections"] == {"code_0": 2}
    assert (await h.record(taskid))["gateway_task_id"] == "tsk_srv"


async def test_run_server_error_rate_with_its_http_status(harness: Harness) -> None:
    h = harness
    await h.configure(run_server_error_rate=1.0, run_server_error_status=503)
    r = await h.run()
    assert (r.status_code, r.json()) == (503, SERVER_ERROR)
    stats = await h.stats()
    assert (stats["run_server_errors"], stats["runs"]) == (1, 0)
    assert stats["run_rejections"] == {"http_503": 1}


async def test_unknown_route_is_error_parsing_url(harness: Harness) -> None:
    h = harness
    for method, path in (("POST", "/v1/Task/Nope"), ("POST", "/v1/Nope"), ("GET", "/v1/Run/x")):
        r = await h.client.request(method, path, json={}, headers=h.headers())
        assert (r.status_code, r.json()) == (404, PARSING_URL), (method, path)
    assert (await h.client.get("/__sim/nope")).status_code == 404  # control routes: plain


async def test_task_list_can_be_switched_off_or_lose_callbackurl(harness: Harness) -> None:
    h = harness
    await h.run_ok(callbackUrl=callback_url("tsk_l"))
    query = {"type": "model", "sort": "id", "order": "DESC", "start": "0", "limit": "20"}
    (item,) = (await h.wiro("Task/List", query)).json()["tasklist"]
    assert item["callbackurl"] == callback_url("tsk_l")

    await h.configure(task_list_callbackurl=False)
    (item,) = (await h.wiro("Task/List", query)).json()["tasklist"]
    assert "callbackurl" not in item and item["status"]

    await h.configure(task_list_enabled=False)
    r = await h.wiro("Task/List", query)
    assert (r.status_code, r.json()) == (404, PARSING_URL)


@pytest.mark.parametrize("shape", ["form", "empty"])
async def test_callback_body_shapes(harness: Harness, shape: str) -> None:
    h = harness
    await h.configure(callback_body=shape)
    taskid = await h.run_ok(callbackUrl=callback_url("tsk_body"))
    task, _ = await h.wait_terminal(taskid)
    deadline = time.monotonic() + 5
    while not h.callbacks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    (request,) = h.callbacks
    assert request.method == "POST"
    if shape == "empty":
        assert request.content == b""
    else:
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        assert (form["id"], form["status"], form["pexit"]) == (taskid, task["status"], "0")
        assert json.loads(form["outputs"]) == task["outputs"]
    (sent,) = (await h.record(taskid))["callbacks"]
    assert (sent["body"], sent["outcome"]) == (shape, 204)


async def test_sim_task_records_by_gateway_task(harness: Harness) -> None:
    h = harness
    first = await h.run_ok(callbackUrl=callback_url("tsk_a"))
    await h.run_ok(callbackUrl=callback_url("tsk_b"))
    every = (await h.client.get("/__sim/tasks")).json()["tasks"]
    assert len(every) == 2
    (only,) = (await h.client.get("/__sim/tasks", params={"gateway_task": "tsk_a"})).json()["tasks"]
    assert only["id"] == first and only["history"][0]["status"] == "task_queue"


async def test_forgetting_finished_tasks_looks_once_per_slack_of_runs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_TASKS`` the simulator forgets its oldest finished tasks, but looks for
    them once per ``PRUNE_SLACK`` new tasks, not on every Run: with more unfinished tasks
    than ``MAX_TASKS`` (P12's hour-long queue), a look per Run scanned them all each time
    and slowed every Run. Finished tasks are still forgotten at the next look."""
    from app.simulator import engine

    monkeypatch.setattr(engine, "MAX_TASKS", 5)
    monkeypatch.setattr(engine, "PRUNE_SLACK", 3)
    sim = harness.app.state.sim
    await sim.reset()  # its next look is past the patched limit
    looks: list[int] = []
    forget = engine.Simulator._forget_finished

    def counted(self: Any) -> None:
        looks.append(len(self.tasks))
        forget(self)

    monkeypatch.setattr(engine.Simulator, "_forget_finished", counted)
    await harness.configure(queue_s=600.0)
    ids = [await harness.run_ok() for _ in range(40)]
    assert len(sim.tasks) == 40  # none finished: none forgotten
    assert looks == [9, 13, 17, 21, 25, 29, 33, 37]  # once per 4th Run, not on 32 of them

    for taskid in ids[:30]:
        assert (await harness.wiro("Task/Cancel", {"taskid": taskid})).json()["result"]
    for _ in range(4):
        await harness.run_ok()
    assert looks == [9, 13, 17, 21, 25, 29, 33, 37, 41]  # the 41st Run's look
    assert set(ids[:30]).isdisjoint(sim.tasks)  # the 30 cancelled are forgotten
    assert set(ids[30:]) <= set(sim.tasks) and len(sim.tasks) == 14


async def test_direct_routes_answer_as_the_declared_ones() -> None:
    """Run, Detail and an output's download go around FastAPI's routing (``DirectRoute``);
    the same requests to an app without those routes get the same answers."""
    config = SimConfig(api_key=KEY, api_secret=SECRET, public_url=BASE, queue_s=0, run_s=0)
    direct = create_sim_app(config)
    declared = create_sim_app(config)
    declared.router.routes = [r for r in declared.router.routes if not isinstance(r, DirectRoute)]
    served = {r.declared.path for r in direct.router.routes if isinstance(r, DirectRoute)}
    assert served == {"/v1/Run/{owner}/{model}", "/v1/Task/Detail", "/cdn/{folder}/{name}"}

    async def answers(app: Any) -> list[tuple[int, str, Any]]:
        nonces = NonceSource()

        def signed(secret: str = SECRET) -> dict[str, str]:
            nonce = str(nonces.next())
            return {"x-api-key": KEY, "x-nonce": nonce, "x-signature": sign(KEY, secret, nonce)}

        out: list[tuple[int, str, Any]] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:

            def keep(r: httpx.Response, shape: Callable[[Any], Any] = lambda body: body) -> None:
                kind = r.headers.get("content-type", "")
                out.append((r.status_code, kind, shape(r.json() if "json" in kind else r.text)))

            run = {"inputImageUrl": f"{BASE}/samples/portrait.jpg", "outputFormat": "png"}
            keep(await c.post(RUN, json=run, headers=signed(secret="wrong")))
            keep(await c.post(RUN, data={"inputImageUrl": "x"}, headers=signed()), sorted)
            r = await c.post(RUN, json=run, headers=signed())
            keep(r, sorted)
            taskid = r.json()["taskid"]
            for _ in range(200):  # the task's driver renders its output
                detail = await c.post("/v1/Task/Detail", json={"taskid": taskid}, headers=signed())
                (task,) = detail.json()["tasklist"]
                if task["outputs"]:
                    break
                await asyncio.sleep(0.02)
            keep(detail, lambda body: sorted(body["tasklist"][0]))
            url = httpx.URL(task["outputs"][0]["url"])
            download = await c.get(url.path)
            out.append(
                (download.status_code, download.headers["content-type"], len(download.content))
            )
            keep(await c.get("/cdn/nothing/here.png"))
            keep(await c.post("/v1/Task/Detail", json={"taskid": "1"}, headers=signed()))
            keep(await c.get("/v1/Task/Detail"))  # another method: the declared route's 405
        await app.state.sim.aclose()
        return out

    got, expected = await answers(direct), await answers(declared)
    assert got == expected
    assert [status for status, _, _ in got] == [401, 200, 200, 200, 200, 404, 200, 404]
