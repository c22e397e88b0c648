"""Structured logs: JSON lines (readable in dev), request and task ids on every line,
X-Request-ID in and out, an access line per request, secrets scrubbed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import logs
from app.settings import Settings
from tests.conftest import CLIENT_KEYS, SIM_KEY, SIM_SECRET, Gateway, Sim, task_body

WIRO_SECRET = "wiro-secret-Zq8vY2pL"
WEBHOOK_SECRET = "whsec_MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY="
CLIENT_KEY = "hgw_live_client_key_9f8e7d"
PG_PASSWORD = "pg-Pa55word-x1"


@pytest.fixture
def capture() -> Iterator[Any]:
    """``capture(settings)`` routes logging into a buffer; the root logger is restored."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()

    def install(settings: Settings) -> io.StringIO:
        logs.setup(settings, stream=buf)
        return buf

    yield install
    root.handlers[:], level = saved
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def secret_settings(**extra: Any) -> Settings:
    return Settings(
        env="test",
        wiro_api_key="wiro-key-7f3a9c",
        wiro_api_secret=WIRO_SECRET,
        webhook_secret=WEBHOOK_SECRET,
        api_keys=f"acme={CLIENT_KEY}",
        database_url=f"postgresql+asyncpg://gw:{PG_PASSWORD}@db:5432/gw",
        **extra,
    )


def test_secrets_are_scrubbed_from_messages_extras_and_tracebacks(capture) -> None:
    buf = capture(secret_settings())
    log = logging.getLogger("app.test")
    log.info("signing with %s and %s", "wiro-key-7f3a9c", WIRO_SECRET)
    log.info("client sent Authorization: Bearer %s", "some-unknown-token.abc")
    log.info(
        "notification signed",
        extra={
            "secret": WEBHOOK_SECRET,
            "client_key": CLIENT_KEY,
            "other": "whsec_bm90IG91ciBzZWNyZXQgYXQgYWxs",
        },
    )
    log.info("callback to http://gw/callbacks/wiro/tsk_01ABC/Zm9vYmFyYmF6cXV4 answered")
    log.info("headers: {'x-api-key': 'another-key-abc', 'x-nonce': '123'}")
    log.info("connecting to postgresql+asyncpg://gw:%s@db:5432/gw", PG_PASSWORD)
    try:
        raise RuntimeError(f"upstream refused key {CLIENT_KEY}")
    except RuntimeError:
        log.exception("call failed")

    text = buf.getvalue()
    for secret in (
        "wiro-key-7f3a9c",
        WIRO_SECRET,
        WEBHOOK_SECRET,
        CLIENT_KEY,
        PG_PASSWORD,
        "some-unknown-token.abc",
        "Zm9vYmFyYmF6cXV4",
        "another-key-abc",
        "bm90IG91ciBzZWNyZXQgYXQgYWxs",
    ):
        assert secret not in text, secret
    out = lines(buf)
    assert len(out) == 7  # every line survived, as JSON
    assert out[1]["msg"] == "client sent Authorization: Bearer [redacted]"
    assert out[2]["secret"] == out[2]["client_key"] == "[redacted]"  # known values
    assert out[2]["other"] == "whsec_[redacted]"  # and anything shaped like one
    assert out[3]["msg"].endswith("/callbacks/wiro/tsk_01ABC/[redacted] answered")
    assert out[5]["msg"] == "connecting to postgresql+asyncpg://gw:[redacted]@db:5432/gw"
    assert out[6]["level"] == "error" and "RuntimeError" in out[6]["exc"]
    assert "[redacted]" in out[6]["exc"]


def _every_pass(redactor: logs.Redactor, text: str) -> str:
    """What ``scrub`` made of every text before its shortcut: the known secrets, then
    each pattern, always."""
    if redactor._known is not None:
        text = redactor._known.sub(logs.REDACTED, text)
    for pattern, repl in logs._PATTERNS:
        text = pattern.sub(repl, text)
    return text


# Pieces that make texts the patterns match, nearly match, or match only by other
# letters (the long s and the Kelvin sign match "s" and "k" case-blind), and plain ones.
_PIECES = [
    CLIENT_KEY,
    WIRO_SECRET,
    CLIENT_KEY[:-1],
    "Bearer ",
    "bEaReR\t",
    "bearer",
    "whsec_",
    "WHSEC_abc",
    "/callbacks/wiro/",
    "tsk_01/",
    "{token}",
    "X-Api-Key: ",
    "x-signature=",
    "x-nonce",
    "x-\u017fignature: ",
    "x-api-\u212aey=",
    "https://",
    "user:pw@",
    "://",
    "@",
    "'",
    '"',
    " ",
    "\u00e9",
    "tsk_01M995P8YS0Y1Y5C120Z9D5TDH",
    "POST /v1/tasks 202",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=8))
def test_the_scrubs_shortcut_leaves_what_every_pass_would(pieces: list[str]) -> None:
    """``Redactor.scrub`` skips its substitutions for ASCII text without a known secret
    or a pattern's word: whatever the text, the result is what all of them give."""
    redactor = logs.Redactor([CLIENT_KEY, WIRO_SECRET])
    text = "".join(pieces)
    assert redactor.scrub(text) == _every_pass(redactor, text)


def test_each_pattern_has_its_word_for_the_shortcut() -> None:
    """A pattern added without the word it needs in ``_NEEDS`` would be skipped."""
    for pattern, _ in logs._PATTERNS:
        assert any(word in pattern.pattern.lower() for word in logs._NEEDS), pattern.pattern


async def test_json_lines_carry_the_context(capture) -> None:
    buf = capture(Settings(env="prod"))
    log = logging.getLogger("app.test")

    async def check() -> None:
        log.info("inside a check")

    logs.bind(request_id="req-1")
    log.info("in a request")
    await asyncio.create_task(check(), context=logs.task_context("tsk_FROMCHECK"))
    log.info("explicit task", extra={"task_id": "tsk_EXPLICIT"})
    a, b, c = lines(buf)
    assert a["request_id"] == "req-1" and "task_id" not in a
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", a["ts"])
    assert (a["level"], a["logger"], a["msg"]) == ("info", "app.test", "in a request")
    # a background check has its own context: its task, not the request it came from
    assert b["task_id"] == "tsk_FROMCHECK" and "request_id" not in b
    assert c["task_id"] == "tsk_EXPLICIT" and c["request_id"] == "req-1"


def test_dev_lines_are_for_humans(capture) -> None:
    buf = capture(Settings(env="dev"))
    logging.getLogger("app.tasks").info("status succeeded", extra={"task_id": "tsk_1"})
    line = buf.getvalue().strip()
    assert not line.startswith("{")
    assert re.match(
        r"^\d\d:\d\d:\d\d\.\d{3} INFO  app\.tasks  status succeeded  task_id=tsk_1$", line
    ), line


async def test_a_request_and_its_task_in_the_logs(gateway: Gateway, sim: Sim, capture) -> None:
    buf = capture(gateway.settings)
    r = await gateway.client().post(
        "/v1/tasks", json=task_body(sim), headers={"X-Request-ID": "req-abc-123"}
    )
    assert r.status_code == 202
    assert r.headers["x-request-id"] == "req-abc-123"
    task = await gateway.wait_terminal(r.json()["id"])
    assert task["status"] == "succeeded"
    record = httpx.get(f"{sim.url}/__sim/tasks/{task['upstream']['task_id']}", timeout=5).json()
    token = record["detail"]["callbackurl"].rsplit("/", 1)[1]

    invalid = "no spaces, at most 128 characters " + "x" * 200
    generated = await gateway.client().get("/v1/tasks", headers={"X-Request-ID": invalid})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])

    out = lines(buf)
    access = [x for x in out if x["logger"] == "app.access" and x["route"] == "/v1/tasks"]
    submit = next(x for x in access if x["method"] == "POST")
    assert submit["status"] == 202 and submit["request_id"] == "req-abc-123"
    assert submit["task_id"] == task["id"] and submit["duration_ms"] > 0
    assert submit["msg"] == "POST /v1/tasks 202"
    listing = next(x for x in access if x["method"] == "GET")
    assert listing["request_id"] == generated.headers["x-request-id"]
    # the callback's access line: the route template, never the token
    callback = [
        x
        for x in out
        if x["logger"] == "app.access" and x["route"] == "/callbacks/wiro/{task_id}/{token}"
    ]
    assert callback and callback[0]["task_id"] == task["id"]
    # every event of the task is a line naming it; the first one came from the request
    events = [x for x in out if x["logger"] == "app.tasks" and x.get("task_id") == task["id"]]
    assert events[0]["request_id"] == "req-abc-123"
    assert (events[0]["kind"], events[0]["status"]) == ("created", "pending")
    assert any(x.get("status") == "succeeded" for x in events)
    text = buf.getvalue()
    for secret in (*CLIENT_KEYS.values(), SIM_SECRET, SIM_KEY, token):
        assert secret not in text
