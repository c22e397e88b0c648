"""WiroClient against recorded bodies and hostile transports (httpx.MockTransport)."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.wiro import (
    RunAccepted,
    UpstreamOutput,
    UpstreamTask,
    WiroAccessDenied,
    WiroAmbiguous,
    WiroAuthError,
    WiroClient,
    WiroConcurrencyLimit,
    WiroConfigError,
    WiroError,
    WiroInsufficientBalance,
    WiroRateLimited,
    WiroRejected,
    WiroServerError,
    WiroStateError,
    WiroUnavailable,
    WiroValidationError,
    error_for_code,
    ids_descending,
    parse_retry_after,
)

FIXTURES = Path(__file__).parent / "fixtures" / "wiro"
BASE = "https://api.wiro.test/v1"
MODEL = "wiro/professional-headshot"
KEY = "key-3f9a1c7e5b"
SECRET = "secret-8d2e6b4a0c"
TASK_ID = "534574"
SOCKET_TOKEN = "ZpYote30on42O4jjHXNiKmrWAZqbRE"
INPUTS = {
    "inputImageUrl": "https://example.com/me.jpg",
    "background": "neutral",
    "safetyTolerance": "2",
    "aspectRatio": "",
    "seed": "42",
    "outputFormat": "jpeg",
}
CALLBACK = "https://gateway.example.com/callbacks/wiro/tsk_01/3q2-token"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


class FakeWiro:
    """A MockTransport handler that records requests and answers as told."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self._respond: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(599)
        self.client: WiroClient

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)

    def reply(
        self,
        status: int = 200,
        body: Any = None,
        *,
        text: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if text is not None:
            self._respond = lambda r: httpx.Response(status, text=text, headers=headers)
        else:
            self._respond = lambda r: httpx.Response(status, json=body, headers=headers)

    def reply_fixture(self, name: str, status: int = 200) -> None:
        self.reply(status, fixture(name))

    def fail(self, exc_type: type[httpx.TransportError]) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            raise exc_type("simulated transport failure", request=request)

        self._respond = respond

    @property
    def last_json(self) -> Any:
        return json.loads(self.requests[-1].content)


@pytest.fixture
async def wiro() -> AsyncIterator[FakeWiro]:
    fake = FakeWiro()
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handler)) as http:
        fake.client = WiroClient(
            base_url=BASE + "/", api_key=SecretStr(KEY), api_secret=SecretStr(SECRET), http=http
        )
        yield fake


# Every call of the client, so that "any non-Run call" cases cover them all.
NON_RUN_CALLS: dict[str, Callable[[WiroClient], Any]] = {
    "detail": lambda c: c.detail(task_id=TASK_ID),
    "cancel": lambda c: c.cancel(TASK_ID),
    "kill": lambda c: c.kill(TASK_ID),
    "input_output_delete": lambda c: c.input_output_delete(SOCKET_TOKEN),
    "list_tasks": lambda c: c.list_tasks(),
    "upload": lambda c: c.upload(filename="me.jpg", content=b"\xff\xd8", content_type="image/jpeg"),
}


def run(client: WiroClient) -> Any:
    return client.run(MODEL, INPUTS, callback_url=CALLBACK)


def call_for_fixture(name: str) -> Callable[[WiroClient], Any]:
    if name.startswith("run_"):
        return run
    prefix = {
        "detail_": "detail",
        "cancel_": "cancel",
        "kill_": "kill",
        "file_upload_": "upload",
        "input_output_delete_": "input_output_delete",
        "error_": "detail",
    }
    for start, call in prefix.items():
        if name.startswith(start):
            return NON_RUN_CALLS[call]
    raise AssertionError(f"no call for fixture {name}")


# -- every recorded body ---------------------------------------------------------------

ERROR_FIXTURES = {
    # name: (exact exception type, code, message)
    "run_error_balance_97": (WiroInsufficientBalance, 97, "Insufficient balance"),
    "run_error_concurrency_96": (
        WiroConcurrencyLimit,
        96,
        "You have reached your concurrent task limit. With your current balance of $12.40, "
        "you can run up to 1 tasks at the same time.",
    ),
    "run_error_auth": (WiroAuthError, 0, "Project authorization is not valid."),
    "run_error_validation": (WiroValidationError, 0, "Request parameter [inputImageUrl] required"),
    "run_error_string_errors": (WiroValidationError, None, "Request parameters are invalid."),
    "run_error_server_0": (WiroServerError, 0, "Internal server error, please try again."),
    "error_parsing_url_404": (WiroConfigError, 0, "Error parsing url."),
    "input_output_delete_not_exist": (WiroStateError, 1, "task-not-exist"),
    "detail_not_found": (WiroStateError, 1, "There is no task yet."),
    "cancel_not_cancellable": (WiroStateError, 1, "Task is not in a cancellable state."),
    "kill_failed": (WiroStateError, 1, "Task could not be killed: task is not running"),
}

DETAIL_FIXTURES = {
    # name: (status, pexit, number of outputs, total_cost, debug_error)
    "detail_queued": ("task_queue", None, 0, "0", None),
    "detail_running": ("task_start", None, 0, "0", None),
    "detail_postprocessing": ("task_postprocess_start", None, 0, "0", None),
    "detail_task_error_interim": ("task_error", None, 0, "0", "UserWarning: xformers not found"),
    "detail_succeeded": ("task_postprocess_end", "0", 1, "0.003510000000", None),
    "detail_succeeded_no_pexit": ("task_postprocess_end", None, 1, "0.003510000000", None),
    "detail_failed": ("task_postprocess_end", "1", 0, "0", "RuntimeError: CUDA out of memory"),
    "detail_cancelled": ("task_cancel", None, 0, "0", None),
}

OK_FIXTURES = {"run_ok", "kill_ok", "file_upload_ok", "input_output_delete_ok"}


def test_every_fixture_has_a_case() -> None:
    on_disk = {path.stem for path in FIXTURES.glob("*.json")}
    assert on_disk == set(ERROR_FIXTURES) | set(DETAIL_FIXTURES) | OK_FIXTURES


async def test_run_ok(wiro: FakeWiro) -> None:
    wiro.reply_fixture("run_ok")
    accepted = await run(wiro.client)
    assert accepted == RunAccepted(task_id=TASK_ID, socket_token=SOCKET_TOKEN)
    assert SOCKET_TOKEN not in repr(accepted)


@pytest.mark.parametrize("result", [True, "true", 1, "1"])
async def test_run_accepts_every_spelling_of_true(wiro: FakeWiro, result: Any) -> None:
    wiro.reply(200, {"result": result, "errors": [], "taskid": 2221, "socketaccesstoken": "t"})
    assert await run(wiro.client) == RunAccepted(task_id="2221", socket_token="t")


@pytest.mark.parametrize("name", sorted(DETAIL_FIXTURES))
async def test_detail_fixtures(wiro: FakeWiro, name: str) -> None:
    status, pexit, n_outputs, total_cost, debug_error = DETAIL_FIXTURES[name]
    wiro.reply_fixture(name)
    task = await wiro.client.detail(task_id=TASK_ID)
    assert isinstance(task, UpstreamTask)
    assert task.id == TASK_ID
    assert task.uuid == "15bce51f-442f-4f44-a71d-13c6374a62bd"
    assert task.status == status
    assert task.pexit == pexit
    assert len(task.outputs) == n_outputs
    assert task.total_cost == total_cost
    assert task.debug_error == debug_error
    assert task.elapsed_seconds == "6.0000"
    assert task.callback_url == CALLBACK
    assert task.socket_token == SOCKET_TOKEN
    assert task.create_time == 1734513807
    assert task.start_time == 1734513809
    assert task.raw["projectid"] == "699"
    assert SOCKET_TOKEN not in repr(task)


async def test_detail_succeeded_outputs_and_times(wiro: FakeWiro) -> None:
    wiro.reply_fixture("detail_succeeded")
    task = await wiro.client.detail(task_id=TASK_ID)
    assert task.outputs == [
        UpstreamOutput(
            name="0.jpeg",
            content_type="image/jpeg",
            size=202472,
            url="https://cdn1.wiro.ai/6a6af820-c5050aee-40bd7b83-a2e186c6-7f61f7da-3894e49c"
            "-fc0eeb66-9b500fe2/0.jpeg",
        )
    ]
    assert task.end_time == 1734513813


async def test_detail_running_has_no_end_time(wiro: FakeWiro) -> None:
    wiro.reply_fixture("detail_running")
    task = await wiro.client.detail(task_id=TASK_ID)
    assert task.end_time is None  # Wiro writes "0" for "not yet"


@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("name", sorted(ERROR_FIXTURES))
async def test_error_fixtures_on_200_and_400(wiro: FakeWiro, name: str, status: int) -> None:
    exc_type, code, message = ERROR_FIXTURES[name]
    wiro.reply_fixture(name, status)
    with pytest.raises(WiroError) as info:
        await call_for_fixture(name)(wiro.client)
    assert type(info.value) is exc_type
    assert info.value.code == code
    assert info.value.message == message
    assert str(info.value) == message
    assert info.value.http_status == status
    assert len(wiro.requests) == 1


@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("name", sorted(n for n in ERROR_FIXTURES if n.startswith("run_")))
async def test_run_error_bodies_classify_the_same_on_other_calls(
    wiro: FakeWiro, name: str, status: int
) -> None:
    exc_type, code, _ = ERROR_FIXTURES[name]
    wiro.reply_fixture(name, status)
    with pytest.raises(WiroError) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert type(info.value) is exc_type
    assert info.value.code == code


def test_error_tree() -> None:
    assert issubclass(WiroRateLimited, WiroUnavailable)
    assert issubclass(WiroConcurrencyLimit, WiroUnavailable)
    for rejected in (WiroInsufficientBalance, WiroAuthError, WiroStateError):
        assert issubclass(rejected, WiroRejected)
    for child in (WiroUnavailable, WiroAmbiguous, WiroRejected):
        assert issubclass(child, WiroError)
    assert not issubclass(WiroAmbiguous, WiroUnavailable)
    assert not issubclass(WiroConcurrencyLimit, WiroRejected)


async def test_detail_not_found_is_no_task(wiro: FakeWiro) -> None:
    wiro.reply_fixture("detail_not_found", 404)
    with pytest.raises(WiroStateError) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert info.value.no_task is True
    assert info.value.http_status == 404


@pytest.mark.parametrize("name", ["cancel_not_cancellable", "kill_failed"])
async def test_state_errors_that_are_not_missing_tasks(wiro: FakeWiro, name: str) -> None:
    wiro.reply_fixture(name)
    with pytest.raises(WiroStateError) as info:
        await call_for_fixture(name)(wiro.client)
    assert info.value.no_task is False


async def test_detail_with_an_empty_tasklist_is_no_task(wiro: FakeWiro) -> None:
    wiro.reply(200, {"result": True, "errors": [], "total": "0", "tasklist": []})
    with pytest.raises(WiroStateError) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert info.value.no_task is True
    assert info.value.code == 1


async def test_detail_by_id_and_by_token(wiro: FakeWiro) -> None:
    wiro.reply_fixture("detail_queued")
    await wiro.client.detail(task_id=TASK_ID)
    assert wiro.last_json == {"taskid": TASK_ID}
    await wiro.client.detail(task_token=SOCKET_TOKEN)
    assert wiro.last_json == {"tasktoken": SOCKET_TOKEN}
    assert str(wiro.requests[-1].url) == f"{BASE}/Task/Detail"
    with pytest.raises(ValueError):
        await wiro.client.detail()
    with pytest.raises(ValueError):
        await wiro.client.detail(task_id=TASK_ID, task_token=SOCKET_TOKEN)


async def test_kill_ok_sends_taskid_and_returns_the_task(wiro: FakeWiro) -> None:
    wiro.reply_fixture("kill_ok")
    task = await wiro.client.kill(TASK_ID)
    assert task is not None
    assert task.status == "task_cancel"
    assert task.total_cost == "0.003510000000"  # a killed task may still be billed
    request = wiro.requests[-1]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/Task/Kill"
    assert wiro.last_json == {"taskid": TASK_ID}


async def test_cancel_sends_taskid_and_may_return_nothing(wiro: FakeWiro) -> None:
    wiro.reply(200, {"result": True, "errors": []})
    assert await wiro.client.cancel(TASK_ID) is None
    request = wiro.requests[-1]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/Task/Cancel"
    assert wiro.last_json == {"taskid": TASK_ID}


async def test_file_upload(wiro: FakeWiro) -> None:
    wiro.reply_fixture("file_upload_ok")
    url = await wiro.client.upload(
        filename="me.jpg", content=b"\xff\xd8jpeg", content_type="image/jpeg"
    )
    assert url == "https://cdn1.wiro.ai/uploads/4f1c2e9a/me.jpg"
    request = wiro.requests[-1]
    assert str(request.url) == f"{BASE}/File/Upload"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="file"; filename="me.jpg"' in request.content
    assert b"Content-Type: image/jpeg" in request.content
    assert b"\xff\xd8jpeg" in request.content


async def test_file_upload_without_url_is_unavailable(wiro: FakeWiro) -> None:
    wiro.reply(200, {"result": True, "errors": [], "list": []})
    with pytest.raises(WiroUnavailable):
        await NON_RUN_CALLS["upload"](wiro.client)


async def test_input_output_delete(wiro: FakeWiro) -> None:
    wiro.reply_fixture("input_output_delete_ok")
    assert await wiro.client.input_output_delete(SOCKET_TOKEN) is None
    assert str(wiro.requests[-1].url) == f"{BASE}/Task/InputOutputDelete"
    assert wiro.last_json == {"tasktoken": SOCKET_TOKEN}


async def test_list_tasks(wiro: FakeWiro) -> None:
    body = fixture("detail_queued")
    body["tasklist"].append(fixture("detail_succeeded")["tasklist"][0])
    wiro.reply(200, body)
    tasks = await wiro.client.list_tasks(limit=20)
    assert [t.status for t in tasks] == ["task_queue", "task_postprocess_end"]
    assert str(wiro.requests[-1].url) == f"{BASE}/Task/List"
    assert wiro.last_json == {
        "type": "model",
        "sort": "id",
        "order": "DESC",
        "start": "0",
        "limit": "20",
    }


# -- what Run sends ----------------------------------------------------------------------


async def test_run_request(wiro: FakeWiro) -> None:
    wiro.reply_fixture("run_ok")
    await run(wiro.client)
    (request,) = wiro.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/Run/wiro/professional-headshot"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body == {**INPUTS, "callbackUrl": CALLBACK}
    assert all(isinstance(value, str) for value in body.values())


async def test_run_without_callback_sends_no_callback_key(wiro: FakeWiro) -> None:
    wiro.reply_fixture("run_ok")
    await wiro.client.run(MODEL, INPUTS, callback_url=None)
    assert wiro.last_json == INPUTS


async def test_default_and_custom_timeouts(wiro: FakeWiro) -> None:
    wiro.reply_fixture("run_ok")
    await run(wiro.client)
    assert wiro.requests[-1].extensions["timeout"] == {
        "connect": 5.0,
        "read": 30.0,
        "write": 30.0,
        "pool": 5.0,
    }
    async with httpx.AsyncClient(transport=httpx.MockTransport(wiro.handler)) as http:
        client = WiroClient(
            base_url=BASE, api_key=KEY, api_secret=SECRET, http=http, timeout=httpx.Timeout(1.0)
        )
        await run(client)
    assert wiro.requests[-1].extensions["timeout"]["read"] == 1.0


# -- Run's uncertain answers -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"result": True, "errors": []},
        {"result": True, "errors": [], "taskid": ""},
        {"result": True, "errors": [], "taskid": None, "socketaccesstoken": "t"},
    ],
)
async def test_run_true_without_taskid_is_ambiguous(wiro: FakeWiro, body: dict[str, Any]) -> None:
    wiro.reply(200, body)
    with pytest.raises(WiroAmbiguous) as info:
        await run(wiro.client)
    assert info.value.task_id is None
    assert info.value.http_status == 200


@pytest.mark.parametrize(
    "reply",
    [
        {"text": "<html>OK</html>"},
        {"text": ""},
        {"body": ["not", "an", "object"]},
        {"body": {"errors": []}},  # no result at all
    ],
)
async def test_2xx_without_a_usable_body(wiro: FakeWiro, reply: dict[str, Any]) -> None:
    wiro.reply(200, **reply)
    with pytest.raises(WiroAmbiguous):
        await run(wiro.client)
    for call in NON_RUN_CALLS.values():
        with pytest.raises(WiroUnavailable):
            await call(wiro.client)


@pytest.mark.parametrize("status", [400, 404, 409, 429, 500, 502, 503, 504])
async def test_run_non_2xx_with_a_taskid_is_ambiguous_with_the_hint(
    wiro: FakeWiro, status: int
) -> None:
    wiro.reply(status, {"result": True, "errors": [], "taskid": "2221", "socketaccesstoken": "t"})
    with pytest.raises(WiroAmbiguous) as info:
        await run(wiro.client)
    assert info.value.task_id == "2221"
    assert info.value.http_status == status


# -- 429 -----------------------------------------------------------------------------------


async def test_429_with_retry_after_seconds(wiro: FakeWiro) -> None:
    wiro.reply(429, text="slow down", headers={"Retry-After": "7"})
    with pytest.raises(WiroRateLimited) as info:
        await run(wiro.client)
    assert info.value.retry_after == 7.0
    assert info.value.http_status == 429
    assert len(wiro.requests) == 1  # no retry inside the client


async def test_429_with_an_error_body_and_a_date(wiro: FakeWiro) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    wiro.reply(429, fixture("run_error_validation"), headers={"Retry-After": when})
    with pytest.raises(WiroRateLimited) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 121
    assert info.value.code == 0


async def test_429_error_body_wins_over_its_code(wiro: FakeWiro) -> None:
    wiro.reply(429, fixture("run_error_balance_97"))
    with pytest.raises(WiroRateLimited) as info:
        await run(wiro.client)
    assert info.value.retry_after is None
    assert info.value.code == 97


def test_parse_retry_after() -> None:
    now = 1_734_513_807.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after(" 30 ") == 30.0
    assert parse_retry_after("-4") == 0.0
    future = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(future, now=now) == 90.0
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


# -- 5xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(500, WiroUnavailable), (502, WiroUnavailable), (503, WiroUnavailable), (504, WiroAmbiguous)],
)
async def test_run_5xx_without_error_body(wiro: FakeWiro, status: int, expected: type) -> None:
    wiro.reply(status, text="<html>Bad Gateway</html>")
    with pytest.raises(WiroError) as info:
        await run(wiro.client)
    assert type(info.value) is expected
    assert info.value.http_status == status
    assert len(wiro.requests) == 1


async def test_run_504_is_ambiguous_even_with_an_error_body(wiro: FakeWiro) -> None:
    wiro.reply(504, fixture("run_error_validation"))
    with pytest.raises(WiroAmbiguous):
        await run(wiro.client)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_non_run_5xx_without_error_body_is_unavailable(wiro: FakeWiro, status: int) -> None:
    for call in NON_RUN_CALLS.values():
        wiro.reply(status, text="upstream trouble")
        with pytest.raises(WiroError) as info:
            await call(wiro.client)
        assert type(info.value) is WiroUnavailable
        assert info.value.http_status == status


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize(
    ("name", "expected", "code"),
    [
        ("run_error_balance_97", WiroInsufficientBalance, 97),
        ("run_error_concurrency_96", WiroConcurrencyLimit, 96),
        ("run_error_auth", WiroAuthError, 0),
        # The documented messages decide, whatever the status (Wiro's statuses are
        # unreliable); other code-0 bodies on a 5xx are server trouble.
        ("run_error_validation", WiroValidationError, 0),
        ("run_error_string_errors", WiroValidationError, None),
        ("run_error_server_0", WiroServerError, 0),
    ],
)
async def test_5xx_with_error_body_classifies_by_code(
    wiro: FakeWiro, status: int, name: str, expected: type, code: int | None
) -> None:
    for call in (run, NON_RUN_CALLS["detail"]):
        wiro.reply_fixture(name, status)
        with pytest.raises(WiroError) as info:
            await call(wiro.client)
        assert type(info.value) is expected
        assert info.value.code == code
        assert info.value.http_status == status


async def test_detail_504_with_no_task_body_is_a_state_error(wiro: FakeWiro) -> None:
    wiro.reply_fixture("detail_not_found", 504)
    with pytest.raises(WiroStateError) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert info.value.no_task


async def test_unknown_code_on_a_5xx_is_unavailable(wiro: FakeWiro) -> None:
    wiro.reply(500, {"result": False, "errors": [{"code": 42, "message": "Database is sad"}]})
    with pytest.raises(WiroError) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert type(info.value) is WiroUnavailable
    assert info.value.code == 42


# -- 4xx without an error body -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, WiroRejected),
        (404, WiroRejected),
        (422, WiroRejected),
        (401, WiroAuthError),
        (403, WiroAuthError),
    ],
)
async def test_4xx_without_error_body(wiro: FakeWiro, status: int, expected: type) -> None:
    for call in (run, *NON_RUN_CALLS.values()):
        wiro.reply(status, text="<html>nope</html>")
        with pytest.raises(WiroError) as info:
            await call(wiro.client)
        assert type(info.value) is expected
        assert info.value.code is None
        assert info.value.http_status == status


@pytest.mark.parametrize("status", [401, 403])
async def test_401_403_with_a_code_0_body_is_auth(wiro: FakeWiro, status: int) -> None:
    wiro.reply_fixture("run_error_validation", status)
    with pytest.raises(WiroAuthError) as info:
        await run(wiro.client)
    assert info.value.code == 0


# -- odd error bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("code", ["97", " 97 ", 97])
async def test_code_as_string(wiro: FakeWiro, code: Any) -> None:
    wiro.reply(
        200, {"result": False, "errors": [{"code": code, "message": "Insufficient balance"}]}
    )
    with pytest.raises(WiroInsufficientBalance) as info:
        await run(wiro.client)
    assert info.value.code == 97


async def test_several_errors_join_messages_and_use_the_first_code(wiro: FakeWiro) -> None:
    wiro.reply(
        200,
        {
            "result": "false",
            "errors": [
                {"code": "96", "message": "Concurrent task limit reached"},
                "Try again later",
                {"code": 97, "message": "Insufficient balance"},
            ],
        },
    )
    with pytest.raises(WiroConcurrencyLimit) as info:
        await run(wiro.client)
    assert info.value.code == 96
    assert "Concurrent task limit reached" in info.value.message
    assert "Try again later" in info.value.message
    assert "Insufficient balance" in info.value.message


@pytest.mark.parametrize("code", [98, 99, "98"])
async def test_sign_in_codes_are_access_denied(wiro: FakeWiro, code: Any) -> None:
    wiro.reply(200, {"result": False, "errors": [{"code": code, "message": "Sign in required"}]})
    with pytest.raises(WiroAccessDenied) as info:
        await wiro.client.detail(task_id=TASK_ID)
    assert info.value.reason == "access_denied"


# Wiro's error reference, message by message: what each means to the gateway.
@pytest.mark.parametrize(
    ("code", "message", "exc_type", "reason"),
    [
        (0, "Request parameter [seed] must be integer or float", WiroValidationError, None),
        (
            0,
            "Request parameter [safetyTolerance] must be between 0 and 6",
            WiroValidationError,
            None,
        ),
        (0, "Request files [inputImage] required", WiroValidationError, None),
        (0, "Project authorization is not founded.", WiroAuthError, None),
        (
            0,
            "Project requires signature authentication. Please use x-signature.",
            WiroAuthError,
            None,
        ),
        (0, "Requested ip 203.0.113.7 is not allowed.", WiroAuthError, None),
        (
            0,
            "Your account has been suspended. Please contact support.",
            WiroAccessDenied,
            "account_suspended",
        ),
        (0, "You don't have any permission for this action.", WiroAccessDenied, "access_denied"),
        (1, "tool-not-accessible", WiroAccessDenied, "access_denied"),
        (1, "slug-owner-project-not-exist", WiroAccessDenied, "model_not_found"),
        (1, "Task is not in a cancellable state.", WiroStateError, None),
        (0, "Something went wrong on our side", WiroServerError, None),
        (0, "Error parsing url.", WiroConfigError, None),
        (42, "Something new", WiroRejected, None),
    ],
)
def test_error_reference_classification(
    code: int, message: str, exc_type: type, reason: str | None
) -> None:
    exc = error_for_code(code, message, http_status=200)
    assert type(exc) is exc_type
    assert getattr(exc, "reason", None) == reason


def test_server_errors_are_retryable_and_config_errors_are_rejections() -> None:
    assert issubclass(WiroServerError, WiroUnavailable)
    assert issubclass(WiroAuthError, WiroConfigError)
    assert issubclass(WiroConfigError, WiroRejected)
    assert issubclass(WiroValidationError, WiroRejected)


def test_task_not_exist_counts_as_gone() -> None:
    gone = error_for_code(1, "task-not-exist", http_status=200)
    busy = error_for_code(
        1, "Task must be completed or cancelled before deleting files", http_status=200
    )
    assert isinstance(gone, WiroStateError) and gone.gone
    assert isinstance(busy, WiroStateError) and not busy.gone


async def test_result_false_without_errors_is_rejected(wiro: FakeWiro) -> None:
    wiro.reply(200, {"result": False, "errors": []})
    with pytest.raises(WiroError) as info:
        await run(wiro.client)
    assert type(info.value) is WiroRejected
    assert info.value.code is None
    assert info.value.message


# -- transport errors ----------------------------------------------------------------------

NOT_SENT = [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout]
MAYBE_SENT = [
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.WriteError,
    httpx.ReadError,
    httpx.RemoteProtocolError,
    httpx.CloseError,
    httpx.NetworkError,
]


@pytest.mark.parametrize("exc_type", NOT_SENT)
async def test_run_transport_error_before_sending_is_unavailable(
    wiro: FakeWiro, exc_type: type[httpx.TransportError]
) -> None:
    wiro.fail(exc_type)
    with pytest.raises(WiroError) as info:
        await run(wiro.client)
    assert type(info.value) is WiroUnavailable
    assert isinstance(info.value.__cause__, exc_type)
    assert info.value.http_status is None
    assert len(wiro.requests) == 1


@pytest.mark.parametrize("exc_type", MAYBE_SENT)
async def test_run_transport_error_after_sending_is_ambiguous(
    wiro: FakeWiro, exc_type: type[httpx.TransportError]
) -> None:
    wiro.fail(exc_type)
    with pytest.raises(WiroAmbiguous) as info:
        await run(wiro.client)
    assert info.value.task_id is None
    assert exc_type.__name__ in info.value.message
    assert isinstance(info.value.__cause__, exc_type)
    assert len(wiro.requests) == 1  # never retried


@pytest.mark.parametrize("exc_type", NOT_SENT + MAYBE_SENT)
async def test_non_run_transport_errors_are_unavailable(
    wiro: FakeWiro, exc_type: type[httpx.TransportError]
) -> None:
    wiro.fail(exc_type)
    for call in NON_RUN_CALLS.values():
        with pytest.raises(WiroError) as info:
            await call(wiro.client)
        assert type(info.value) is WiroUnavailable
    assert len(wiro.requests) == len(NON_RUN_CALLS)


# -- no secrets in errors ------------------------------------------------------------------


async def test_no_exception_shows_credentials(wiro: FakeWiro) -> None:
    scenarios: list[Callable[[], None]] = [
        lambda: wiro.fail(httpx.ConnectError),
        lambda: wiro.fail(httpx.ReadTimeout),
        lambda: wiro.fail(httpx.RemoteProtocolError),
        lambda: wiro.reply(401, text="unauthorized"),
        lambda: wiro.reply(429, text="slow", headers={"Retry-After": "3"}),
        lambda: wiro.reply(504, text="gateway timeout"),
        lambda: wiro.reply(200, text="not json"),
        lambda: wiro.reply(200, {"errors": []}),
        lambda: wiro.reply_fixture("run_error_auth"),
        lambda: wiro.reply_fixture("run_error_balance_97", 500),
        lambda: wiro.reply_fixture("detail_not_found"),
    ]
    seen = 0
    for scenario in scenarios:
        for call in (run, *NON_RUN_CALLS.values()):
            scenario()
            with pytest.raises(WiroError) as info:
                await call(wiro.client)
            exc = info.value
            sent = wiro.requests[-1].headers
            for text in (str(exc), repr(exc), repr(exc.args)):
                assert KEY not in text
                assert SECRET not in text
                assert sent.get("x-signature", "-") not in text
            seen += 1
    assert seen == len(scenarios) * (1 + len(NON_RUN_CALLS))
    assert KEY not in repr(wiro.client)
    assert SECRET not in repr(wiro.client)


def test_error_reprs() -> None:
    assert repr(WiroInsufficientBalance("Insufficient balance", code=97, http_status=200)) == (
        "WiroInsufficientBalance(message='Insufficient balance', code=97, http_status=200)"
    )
    assert "retry_after=2.0" in repr(WiroRateLimited("slow", retry_after=2.0))
    assert "task_id='9'" in repr(WiroAmbiguous("?", task_id="9"))


# -- defensive parsing ---------------------------------------------------------------------


def test_upstream_task_from_odd_wire_values() -> None:
    task = UpstreamTask.from_wire(
        {
            "id": 7,
            "status": "task_postprocess_end",
            "pexit": 0,
            "totalcost": "0",
            "createtime": "",
            "starttime": "not a time",
            "endtime": "1734513813",
            "outputs": [
                {"name": "0.png", "size": "12.0", "url": "https://cdn/x.png"},
                {"name": "no-url"},
                "junk",
            ],
        }
    )
    assert task.id == "7"
    assert task.pexit == "0"
    assert task.total_cost == "0"
    assert task.create_time is None
    assert task.start_time is None
    assert task.end_time == 1734513813
    assert task.outputs == [
        UpstreamOutput(name="0.png", content_type=None, size=12, url="https://cdn/x.png")
    ]


def test_upstream_task_from_an_empty_dict() -> None:
    task = UpstreamTask.from_wire({})
    assert task.id == ""
    assert task.status == ""
    assert task.uuid is None
    assert task.pexit is None
    assert task.outputs == []
    assert task.total_cost is None
    assert task.socket_token is None
    assert task.raw == {}


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (["534575", "534574", "12"], True),
        (["534574"], True),
        ([], True),
        (["12", "534574"], False),  # ascending
        (["7", "7"], False),  # not strictly
        (["534574", "abc"], False),
        (["²", "1"], False),  # a digit to str.isdigit, not to int()
        (["", "1"], False),
    ],
)
def test_ids_descending(ids: list[str], expected: bool) -> None:
    """Only numeric, strictly descending ids tell where Wiro lists a task (anchors)."""
    assert ids_descending(ids) is expected
