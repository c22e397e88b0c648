"""The pieces of ``upstream-check``: what is checked, how answers and callbacks are
caught and judged, and the report."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import uvicorn

from app.settings import Settings
from app.wiro.client import error_for_code
from app.wiro.errors import WiroAuthError
from app.wiro.signing import NonceSource, sign

HELD, NOT_HELD, UNKNOWN = "held", "not_held", "unknown"
HELD, NOT_HELD, UNKNOWN = "held", "not_held", "unknown"
# Documented statuses (wiro-api.md); Detail's answers are judged against this set.
STATUSES = frozenset({
    "task_queue", "task_accept", "task_assign", "task_preprocess_start", "task_preprocess_end",
    "task_start", "task_output", "task_output_full", "task_end", "task_postprocess_start",
    "task_postprocess_end", "task_error", "task_error_full", "task_cancel",
})  # fmt: skip
TERMINAL = frozenset({"task_postprocess_end", "task_cancel"})
LIST_QUERY = {"type": "model", "sort": "id", "order": "DESC", "start": "0", "limit": "20"}
NO_SUCH_TASK = "0"  # a task id no project has: Detail must answer "no task", not "who are you"
CALLBACK_PREFIX = "/callbacks/wiro/upstream-check/"
SAMPLE_INPUTS = {"background": "neutral", "safetyTolerance": "2", "aspectRatio": "",
                 "seed": "42", "outputFormat": "jpeg"}  # fmt: skip
MAX_DOWNLOAD = 100 * 1024 * 1024

# The checks, in report order; those after "upload" need --run.
CHECKS = [
    "reachable", "auth", "auth_mode", "nonce", "task_list", "task_list_callbackurl",
    "task_list_order", "upload", "run_answer", "stages", "detail_pexit", "detail_outputs",
    "detail_totalcost", "detail_callbackurl", "output_download", "callback", "callback_body",
    "input_output_delete",
]  # fmt: skip
RUN_CHECKS = CHECKS[CHECKS.index("upload") :]


@dataclass
class Check:
    name: str
    verdict: str = UNKNOWN
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def set(self, verdict: str, detail: str, **data: Any) -> None:
        self.verdict, self.detail = verdict, detail
        self.data.update(data)


@dataclass
class Report:
    target: str
    configured_mode: str
    ran_task: bool
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(c.verdict != NOT_HELD for c in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "configured_mode": self.configured_mode,
            "ran_task": self.ran_task,
            "ok": self.ok,
            "checks": {
                c.name: {"verdict": c.verdict, "detail": c.detail, "data": c.data}
                for c in self.checks.values()
            },
        }

    def table(self) -> str:
        lines = [f"Wiro at {self.target} ({self.configured_mode} mode configured)", ""]
        width = max(len(name) for name in self.checks)
        lines.append(f"{'CHECK':<{width}}  {'RESULT':<9} DETAIL")
        for c in self.checks.values():
            lines.append(f"{c.name:<{width}}  {c.verdict.replace('_', ' '):<9} {c.detail}")
        held = sum(c.verdict == HELD for c in self.checks.values())
        bad = sum(c.verdict == NOT_HELD for c in self.checks.values())
        lines += ["", f"{held} held, {bad} not held, {len(self.checks) - held - bad} unknown"]
        return "\n".join(lines)


@dataclass
class Options:
    run: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    callback_base: str | None = None  # default: GATEWAY_PUBLIC_URL
    wait_s: float = 600.0  # for the task to end
    callback_wait_s: float = 30.0  # for the callback, once the task has ended
    poll_s: float = 3.0


@dataclass
class Answer:
    """One raw answer: HTTP status and the body when it is a JSON object."""

    status: int
    body: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return (
            200 <= self.status < 300
            and self.body is not None
            and (self.body.get("result") in (True, "true", 1))
        )

    def error(self) -> tuple[int | None, str]:
        errors = (self.body or {}).get("errors")
        first = errors[0] if isinstance(errors, list) and errors else None
        if isinstance(first, dict):
            code = first.get("code")
            try:
                number = int(code) if code is not None else None
            except (TypeError, ValueError):
                number = None
            return number, str(first.get("message") or "")
        return None, str(first) if first is not None else ""

    def auth_refused(self) -> bool:
        if self.ok:
            return False
        if self.status in (401, 403):
            return True
        return isinstance(error_for_code(*self.error(), http_status=self.status), WiroAuthError)

    def summary(self) -> dict[str, Any]:
        code, message = self.error() if not self.ok else (None, "")
        out: dict[str, Any] = {"http_status": self.status}
        if not self.ok:
            out |= {"code": code, "message": message[:200]}
        return out


class Raw:
    """Thin signed POSTs that keep the whole answer (WiroClient parses it away)."""

    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        self.http = http
        self.base = settings.wiro_base_url
        self.key = settings.wiro_api_key.get_secret_value() if settings.wiro_api_key else ""
        secret = settings.wiro_api_secret
        self.secret = secret.get_secret_value() if secret else ""
        self.nonces = NonceSource()

    def headers(self, *, signed: bool = True, nonce: str | None = None) -> dict[str, str]:
        if not signed or not self.secret:
            return {"x-api-key": self.key}
        nonce = nonce if nonce is not None else str(self.nonces.next())
        return {"x-api-key": self.key, "x-nonce": nonce,
                "x-signature": sign(self.key, self.secret, nonce)}  # fmt: skip

    async def post(self, path: str, body: dict[str, Any], **headers: Any) -> Answer:
        url, auth = self.base + path, self.headers(**headers)
        response = await self.http.post(url, json=body, headers=auth)
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        return Answer(response.status_code, parsed if isinstance(parsed, dict) else None)


# -- the callback listener ---------------------------------------------------------------


@dataclass
class Caught:
    method: str
    content_type: str
    body: bytes


class CallbackCatcher:
    """A tiny HTTP server that records requests under one secret path and answers 204."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.path = path
        self.caught: list[Caught] = []
        self.arrived = asyncio.Event()
        config = uvicorn.Config(self._app, host=host, port=port, log_level="warning",
                                lifespan="off", access_log=False, log_config=None,
                                interface="asgi3")  # fmt: skip
        self.server = uvicorn.Server(config)
        self._serving: asyncio.Task[None] | None = None

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False) and sum(map(len, chunks)) < 1024 * 1024
        status = 404
        if scope["path"] == self.path:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
            self.caught.append(Caught(scope["method"], headers.get("content-type", ""),
                                      b"".join(chunks)))  # fmt: skip
            self.arrived.set()
            status = 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def __aenter__(self) -> CallbackCatcher:
        # Bound here, so that a taken port is an OSError (uvicorn would sys.exit).
        config = self.server.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.host, config.port))
        except OSError:
            sock.close()
            raise
        self._serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._serving.done():
                self._serving.result()
                raise OSError("the callback listener stopped before it started")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._serving is not None:
            await self._serving


def body_shape(caught: Caught, task_id: str) -> dict[str, Any]:
    """What a callback body looks like (never the body itself: it holds tokens)."""
    text = caught.body
    shape, data = "other", None
    if not text.strip():
        shape = "empty"
    else:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            if isinstance(data.get("tasklist"), list) and data["tasklist"]:
                shape, data = "tasklist", data["tasklist"][0]
            elif "status" in data and ("id" in data or "taskid" in data):
                shape = "detail"
            else:
                shape = "json"
        elif data is not None:
            shape = "json"
        else:
            try:
                form = parse_qs(text.decode(), max_num_fields=200, strict_parsing=True)
            except (ValueError, UnicodeDecodeError):
                form = {}
            if form:
                shape, data = "form", {k: v[0] for k, v in form.items()}
    names = isinstance(data, dict) and task_id in (str(data.get("id")), str(data.get("taskid")))
    fields = sorted(data)[:40] if isinstance(data, dict) else []
    return {"shape": shape, "names_task": bool(names), "fields": fields, "bytes": len(text)}


# -- the checks --------------------------------------------------------------------------


def _said(answer: Answer) -> str:
    if answer.ok:
        return f"HTTP {answer.status}, result true"
    code, message = answer.error()
    return f"HTTP {answer.status}, code {code}: {message[:160] or 'no message'}"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value).strip() or None


def _same_url(value: Any, sent: str) -> bool:
    return isinstance(value, str) and value.strip().rstrip("/") == sent.rstrip("/")


def _output_urls(task: dict[str, Any]) -> list[str]:
    outputs = task.get("outputs")
    if isinstance(outputs, str):
        try:
            outputs = json.loads(outputs)
        except ValueError:
            outputs = None
    if not isinstance(outputs, list):
        return []
    return [o["url"] for o in outputs if isinstance(o, dict) and isinstance(o.get("url"), str)
            and o["url"].strip()]  # fmt: skip
