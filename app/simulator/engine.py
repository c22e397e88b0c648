"""What the simulator does: auth, the Wiro calls, task drivers, callbacks, stores, stats.

Every task gets one driver (an asyncio task) that wakes at ``task_assign``, fetches and
renders the input in a thread, sleeps until the planned end and then finishes the task
and fires its callback. Status between those points is computed from the clock
(see ``state.py``), so Detail is exact without a polling loop.

All state lives on one event loop; a check-then-set with no ``await`` in between is
therefore atomic, which is what makes the Kill/completion race well defined.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import re
import secrets
import string
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.simulator import images
from app.simulator.config import SimConfig
from app.simulator.state import MODEL, QUEUED, TERMINAL, Fate, SimFile, SimOutput, SimTask
from app.wiro.signing import verify

log = logging.getLogger("app.simulator")

MAX_TASKS = 20_000  # oldest finished tasks are forgotten beyond this
MAX_OUTPUTS = 2_000
MAX_FILES = 500
MAX_FILES_BYTES = 512 * 1024 * 1024
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MAX_INPUT_BYTES = 100 * 1024 * 1024
MAX_NONCES = 200_000
INPUT_TIMEOUT_S = 10.0
CALLBACK_TIMEOUT_S = 10.0
FAIL_MESSAGE = "RuntimeError: CUDA out of memory"
NO_TASK = "There is no task yet."

ENUMS: dict[str, tuple[str, frozenset[str]]] = {
    "background": ("neutral", frozenset({"white", "black", "neutral", "gray", "office"})),
    "safetyTolerance": ("2", frozenset({"2"})),
    "aspectRatio": (
        "",
        frozenset(
            {"", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4"}
            | {"21:9", "9:21", "2:1", "1:2"}
        ),
    ),
    "outputFormat": ("jpeg", frozenset({"jpeg", "png"})),
}
_SEED = re.compile(r"-?\d{1,19}")
_GATEWAY_TASK = re.compile(r"/callbacks/wiro/([^/?#]+)/")
_TOKEN_CHARS = string.ascii_letters + string.digits


class WiroFail(Exception):
    """A Wiro error answer: ``{"result": false, "errors": [{"code", "message"}]}``."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        http_status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"result": False, "errors": [{"code": self.code, "message": self.message}]}


def auth_failure() -> WiroFail:
    return WiroFail(0, "Project authorization is not valid.", http_status=401)


@dataclass(frozen=True)
class RunOutcome:
    body: dict[str, Any]
    drop_connection: bool


def normalize_fields(raw: dict[str, Any]) -> dict[str, str]:
    """Wiro's values are strings: turn JSON numbers/booleans into their string form."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            out[key] = str(int(value))
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


def validate_run(fields: dict[str, str]) -> tuple[dict[str, str], str]:
    """The model's parameters with defaults filled in, and the callback URL ("" if none)."""
    url = fields.get("inputImageUrl", "").strip()
    if not url:
        raise WiroFail(0, "Request parameter [inputImageUrl] required")
    params = {"inputImageUrl": url}
    for name, (default, allowed) in ENUMS.items():
        value = fields.get(name, default)
        if value not in allowed:
            raise WiroFail(0, f"Request parameter [{name}] is invalid")
        params[name] = value
    seed = fields.get("seed", "").strip() or "42"
    if not _SEED.fullmatch(seed):
        raise WiroFail(0, "Request parameter [seed] is invalid")
    params["seed"] = seed
    ordered = {k: params[k] for k in ("inputImageUrl", "background", "safetyTolerance")}
    ordered |= {k: params[k] for k in ("aspectRatio", "seed", "outputFormat")}
    callback = fields.get("callbackUrl", "").strip()
    if callback:
        parts = urlsplit(callback)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WiroFail(0, "Request parameter [callbackUrl] is invalid")
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise WiroFail(0, "Request parameter [callbackUrl] is invalid")
    return ordered, callback


def _token(n: int = 30) -> str:
    return "".join(secrets.choice(_TOKEN_CHARS) for _ in range(n))


def _safe_name(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return cleaned[:120] or "file"


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


class Simulator:
    """The whole simulated upstream; one per app (``app.state.sim``)."""

    def __init__(self, config: SimConfig, *, http_client: httpx.AsyncClient | None = None):
        self.config = config
        self.rng = random.Random(config.seed)
        self._http = http_client
        self._owns_http = http_client is None
        self._next_id = int(time.time() * 1000)  # distinct across restarts
        self._background: set[asyncio.Task[Any]] = set()
        self._nonces: set[str] = set()
        self._nonce_order: deque[str] = deque()
        self.sample_jpeg = images.sample_portrait()
        self.files: OrderedDict[str, SimFile] = OrderedDict()
        self._files_bytes = 0
        self._forget()

    def _forget(self) -> None:
        self.tasks: dict[str, SimTask] = {}
        self.by_token: dict[str, SimTask] = {}
        self.active: set[str] = set()  # counted against max_concurrency
        self.outputs: OrderedDict[str, SimOutput] = OrderedDict()
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.runs_by_gateway: Counter[str] = Counter()
        self.billable_by_gateway: Counter[str] = Counter()

    # -- plumbing ------------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=CALLBACK_TIMEOUT_S, headers={"user-agent": "wiro-simulator"}
            )
            self._owns_http = True
        return self._http

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_background(self) -> None:
        pending = list(self._background)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        await self._cancel_background()
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def reset(self) -> None:
        """Forget tasks, outputs and stats; keep config, uploaded files and seen nonces."""
        await self._cancel_background()
        self._forget()
        self.rng = random.Random(self.config.seed)

    def set_config(self, patch: dict[str, Any]) -> SimConfig:
        new = self.config.updated(patch)
        if new.seed != self.config.seed:
            self.rng = random.Random(new.seed)
        self.config = new
        return new

    # -- auth ----------------------------------------------------------------------------

    def check_auth(self, headers: Any) -> None:
        cfg = self.config
        try:
            self._check_auth(cfg, headers)
        except WiroFail:
            self.counters["auth_failures"] += 1
            raise

    def _check_auth(self, cfg: SimConfig, headers: Any) -> None:
        key = headers.get("x-api-key") or ""
        if not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
            raise auth_failure()
        if not cfg.secret:
            return  # key-only project
        nonce = headers.get("x-nonce") or ""
        signature = headers.get("x-signature") or ""
        if not nonce and not signature and not cfg.sign_required:
            return
        if not nonce or not signature or not verify(key, cfg.secret, nonce, signature):
            raise auth_failure()
        if cfg.nonce_reuse_rejected and nonce in self._nonces:
            raise auth_failure()
        if nonce not in self._nonces:
            self._nonces.add(nonce)
            self._nonce_order.append(nonce)
            if len(self._nonce_order) > MAX_NONCES:
                self._nonces.discard(self._nonce_order.popleft())

    # -- Run -----------------------------------------------------------------------------

    async def run(self, owner: str, model: str, fields: dict[str, str]) -> RunOutcome:
        self.counters["run_calls"] += 1
        cfg = self.config
        try:
            if (owner, model) != MODEL:
                raise WiroFail(1, f"Model {owner}/{model} not found.")
            if self._draw(cfg.run_429_rate):
                raise WiroFail(
                    0, "Too many requests.", http_status=429, headers={"Retry-After": "1"}
                )
            if self._draw(cfg.run_5xx_rate):
                raise WiroFail(0, "Internal server error.", http_status=500)
            params, callback = validate_run(fields)
            if cfg.balance_exhausted:
                raise WiroFail(97, "Insufficient balance")
            limit = cfg.max_concurrency
            if limit and len(self.active) >= limit:
                raise WiroFail(
                    96,
                    "You have reached your concurrent task limit. With your current balance"
                    f" of ${limit * 10 + 2.4:.2f}, you can run up to {limit} tasks at the"
                    " same time.",
                )
        except WiroFail as exc:
            reason = f"http_{exc.http_status}" if exc.http_status != 200 else f"code_{exc.code}"
            self.rejections[reason] += 1
            raise

        task = self._create(cfg, params, callback)
        if cfg.callback_early and task.callbackurl:
            # Wiro has been seen to call back before Run answers: wait for that POST.
            body = task.to_wire(task.created_mono, cfg.public_url)
            await self._post_callback(task, body, kind="early", retries=0)
        if cfg.run_hang_s > 0:
            await asyncio.sleep(cfg.run_hang_s)
        body = {"errors": [], "taskid": task.id, "socketaccesstoken": task.token, "result": True}
        return RunOutcome(body, cfg.run_drop_connection)

    def _create(self, cfg: SimConfig, params: dict[str, str], callback: str) -> SimTask:
        fate = Fate.OK
        if self._draw(cfg.lost_rate):
            fate = Fate.LOST
        elif self._draw(cfg.task_error_fatal_rate):
            fate = Fate.STUCK
        elif self._draw(cfg.fail_rate):
            fate = Fate.FAIL
        self._next_id += 1
        match = _GATEWAY_TASK.search(urlsplit(callback).path) if callback else None
        task = SimTask(
            id=str(self._next_id),
            uuid=str(uuid.uuid4()),
            token=_token(),
            parameters=params,
            callbackurl=callback,
            gateway_task_id=match.group(1) if match else None,
            created_mono=time.monotonic(),
            created_wall=time.time(),
            queue_s=cfg.queue_s,
            run_s=cfg.run_s,
            error_s=cfg.task_error_s,
            fate=fate,
        )
        self.tasks[task.id] = task
        self.by_token[task.token] = task
        if fate != Fate.LOST:  # a lost task is gone for the account too
            self.active.add(task.id)
        self.counters["runs"] += 1
        if task.gateway_task_id:
            self.runs_by_gateway[task.gateway_task_id] += 1
        self._spawn(self._drive(task))
        self._prune_tasks()
        return task

    def _prune_tasks(self) -> None:
        if len(self.tasks) <= MAX_TASKS + 500:
            return
        for task in list(self.tasks.values()):
            if len(self.tasks) <= MAX_TASKS:
                break
            if task.fate == Fate.LOST or task.ended_at is not None:
                del self.tasks[task.id]
                self.by_token.pop(task.token, None)

    def _mark_billable(self, task: SimTask, now: float) -> None:
        """A run is billable once assigned (i.e. not cancelled while queued)."""
        if task.billable or now < task.assign_at:
            return
        if task.cancelled_at is not None and task.cancelled_at < task.assign_at:
            return
        task.billable = True
        self.counters["billable_runs"] += 1
        if task.gateway_task_id:
            self.billable_by_gateway[task.gateway_task_id] += 1

    # -- the task driver -----------------------------------------------------------------

    async def _drive(self, task: SimTask) -> None:
        try:
            await _sleep_until(task.assign_at)
            self._mark_billable(task, time.monotonic())
            if task.cancelled_at is not None or task.fate in (Fate.LOST, Fate.STUCK):
                return
            rendered: images.RenderedImage | None = None
            failure = FAIL_MESSAGE if task.fate == Fate.FAIL else ""
            if not failure:
                try:
                    data = await self._load_input(task.parameters["inputImageUrl"])
                    rendered = await asyncio.to_thread(
                        images.render_cached,
                        data,
                        background=task.parameters["background"],
                        aspect_ratio=task.parameters["aspectRatio"],
                        output_format=task.parameters["outputFormat"],
                    )
                except images.ImageFailure as exc:
                    failure = f"ValueError: {exc}"
            await _sleep_until(task.planned_end)
            if task.cancelled_at is None:  # else: killed meanwhile, Kill fired the callback
                self._finish(task, rendered, failure)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("simulator: driver of task %s crashed", task.id)

    async def _load_input(self, url: str) -> bytes:
        base = self.config.public_url
        if url.startswith(base + "/"):
            data = self._local_bytes(urlsplit(url[len(base) :]).path)
            if data is None:
                raise images.ImageFailure(f"cannot download {url}: HTTP 404")
            return data
        if urlsplit(url).scheme not in ("http", "https"):
            raise images.ImageFailure(f"cannot download {url}: not an http(s) URL")
        try:
            async with self.http.stream(
                "GET", url, timeout=INPUT_TIMEOUT_S, follow_redirects=True
            ) as response:
                if response.status_code != 200:
                    raise images.ImageFailure(f"cannot download {url}: HTTP {response.status_code}")
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > MAX_INPUT_BYTES:
                        raise images.ImageFailure(f"cannot download {url}: larger than 100 MB")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise images.ImageFailure(
                f"cannot download {url}: {type(exc).__name__} {exc}".rstrip()
            ) from exc

    def _local_bytes(self, path: str) -> bytes | None:
        if path == "/samples/portrait.jpg":
            return self.sample_jpeg
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "files":
            file = self.uploaded_file(parts[1], parts[2])
            return file.data if file else None
        if len(parts) == 3 and parts[0] == "cdn":
            output = self.output_file(parts[1], parts[2])
            return output.data if output else None
        return None

    def _finish(self, task: SimTask, rendered: images.RenderedImage | None, failure: str) -> None:
        now = time.monotonic()
        if rendered is not None and not failure:
            output = SimOutput(
                id=secrets.token_hex(16),
                folder=secrets.token_hex(16),
                name=rendered.name,
                contenttype=rendered.contenttype,
                parentid=secrets.token_hex(16),
                accesskey=_token(),
                task_uuid=task.uuid,
                data=rendered.data,
                added_wall=time.time(),
                finished_mono=now,
            )
            task.outputs = [output]
            self.outputs[output.folder] = output
            while len(self.outputs) > MAX_OUTPUTS:
                self.outputs.popitem(last=False)
            task.pexit = "0"
        else:
            task.pexit = "1"
            task.failure = failure or FAIL_MESSAGE
        task.finished_at = now
        self.active.discard(task.id)
        self._on_terminal(task)

    # -- callbacks -----------------------------------------------------------------------

    def _on_terminal(self, task: SimTask) -> None:
        """Schedule the completion callback(s) of a task that just became terminal."""
        if not task.callbackurl:
            return
        cfg = self.config
        if self._draw(cfg.callback_drop):
            self.counters["callbacks_dropped"] += 1
            task.callbacks.append({"kind": "final", "outcome": "dropped"})
            return
        now = time.monotonic()
        final = task.to_wire(now, cfg.public_url)
        stale_at = task.stale_time() if cfg.callback_reorder else None
        stale = task.to_wire(stale_at, cfg.public_url) if stale_at is not None else None
        self._spawn(
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
            *(
                self._post_callback(task, final, kind="final", retries=retries)
                for _ in range(copies)
            )
        )
        if stale is not None:
            await self._post_callback(task, stale, kind="reorder", retries=retries)

    async def _post_callback(
        self, task: SimTask, body: dict[str, Any], *, kind: str, retries: int
    ) -> bool:
        """POST ``body`` with retries; never raises (a callback must not break anything)."""
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            self.counters["callback_attempts"] += 1
            try:
                response = await self.http.post(
                    task.callbackurl, json=body, timeout=CALLBACK_TIMEOUT_S
                )
                outcome: int | str = response.status_code
                ok = 200 <= response.status_code < 300
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome, ok = f"{type(exc).__name__}: {exc}".rstrip(": "), False
            task.callbacks.append(
                {"kind": kind, "status": body["status"], "attempt": attempt, "outcome": outcome}
            )
            if ok:
                self.counters["callbacks_sent"] += 1
                return True
        self.counters["callbacks_failed"] += 1
        return False

    # -- Task/* --------------------------------------------------------------------------

    def _find(self, fields: dict[str, str]) -> SimTask:
        taskid = fields.get("taskid", "")
        token = fields.get("tasktoken") or fields.get("socketaccesstoken") or ""
        if not taskid and not token:
            raise WiroFail(0, "Request parameter [taskid] required")
        task = self.tasks.get(taskid) if taskid else self.by_token.get(token)
        if task is None or task.fate == Fate.LOST:
            raise WiroFail(1, NO_TASK)
        return task

    def detail(self, fields: dict[str, str]) -> dict[str, Any]:
        self.counters["detail_calls"] += 1
        if self._draw(self.config.detail_5xx_rate):
            raise WiroFail(0, "Internal server error.", http_status=500)
        task = self._find(fields)
        now = time.monotonic()
        self._mark_billable(task, now)
        wire = task.to_wire(now, self.config.public_url)
        return {"total": "1", "errors": [], "tasklist": [wire], "result": True}

    def cancel(self, fields: dict[str, str]) -> dict[str, Any]:
        self.counters["cancel_calls"] += 1
        task = self._find(fields)
        now = time.monotonic()
        if task.status_at(now) not in QUEUED:
            raise WiroFail(1, "Task is not in a cancellable state.")
        return self._stop(task, now, "cancel")

    def kill(self, fields: dict[str, str]) -> dict[str, Any]:
        self.counters["kill_calls"] += 1
        task = self._find(fields)
        now = time.monotonic()
        status = task.status_at(now)
        if status in QUEUED or status in TERMINAL:
            raise WiroFail(1, "Task could not be killed: task is not running")
        self._mark_billable(task, now)
        return self._stop(task, now, "kill")

    def _stop(self, task: SimTask, now: float, kind: str) -> dict[str, Any]:
        task.cancelled_at = now
        task.cancel_kind = kind
        self.active.discard(task.id)
        self._on_terminal(task)
        wire = task.to_wire(now, self.config.public_url)
        return {"errors": [], "tasklist": [wire], "result": True}

    def input_output_delete(self, fields: dict[str, str]) -> dict[str, Any]:
        self.counters["delete_calls"] += 1
        task = self._find(fields)
        if not task.is_terminal(time.monotonic()):
            raise WiroFail(1, "Task is not finished yet.")
        for output in task.outputs:
            self.outputs.pop(output.folder, None)
            output.data = b""
        task.outputs_deleted = True
        return {"result": True, "errors": []}

    def list_tasks(self, fields: dict[str, str]) -> dict[str, Any]:
        self.counters["list_calls"] += 1
        start = max(0, _int(fields.get("start"), 0))
        limit = min(1000, max(1, _int(fields.get("limit"), 20)))
        visible = [t for t in self.tasks.values() if t.fate != Fate.LOST]
        if fields.get("order", "DESC").upper() != "ASC":
            visible.reverse()
        now, base = time.monotonic(), self.config.public_url
        page = [t.to_wire(now, base) for t in visible[start : start + limit]]
        return {"result": True, "errors": [], "total": str(len(visible)), "tasklist": page}

    # -- files ---------------------------------------------------------------------------

    def upload(self, name: str, contenttype: str, data: bytes) -> dict[str, Any]:
        self.counters["upload_calls"] += 1
        if len(data) > MAX_UPLOAD_BYTES:
            raise WiroFail(0, "File is too large (max 100 MB).", http_status=413)
        file = SimFile(secrets.token_hex(12), _safe_name(name), contenttype, data)
        self.files[file.id] = file
        self._files_bytes += len(data)
        while len(self.files) > 1 and (
            len(self.files) > MAX_FILES or self._files_bytes > MAX_FILES_BYTES
        ):
            _, old = self.files.popitem(last=False)
            self._files_bytes -= len(old.data)
        url = f"{self.config.public_url}/files/{file.id}/{file.name}"
        item = {
            "id": file.id,
            "name": file.name,
            "contenttype": file.contenttype,
            "size": str(len(data)),
            "url": url,
        }
        return {"result": True, "errors": [], "list": [item]}

    def uploaded_file(self, file_id: str, name: str) -> SimFile | None:
        file = self.files.get(file_id)
        return file if file is not None and file.name == name else None

    def output_file(self, folder: str, name: str) -> SimOutput | None:
        output = self.outputs.get(folder)
        if output is None or output.name != name:
            return None
        if time.monotonic() - output.finished_mono > self.config.output_ttl_s:
            return None
        return output

    # -- control -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        statuses: Counter[str] = Counter()
        for task in self.tasks.values():
            self._mark_billable(task, now)
            statuses["lost" if task.fate == Fate.LOST else task.status_at(now)] += 1
        c = self.counters
        return {
            "runs": c["runs"],
            "runs_by_gateway_task": dict(self.runs_by_gateway),
            "billable_by_gateway_task": {
                g: self.billable_by_gateway[g] for g in self.runs_by_gateway
            },
            "detail_calls": c["detail_calls"],
            "cancel_calls": c["cancel_calls"],
            "kill_calls": c["kill_calls"],
            "callbacks_sent": c["callbacks_sent"],
            "callbacks_failed": c["callbacks_failed"],
            "status_counts": dict(statuses),
            # Extras beyond the brief.
            "run_calls": c["run_calls"],
            "run_rejections": dict(self.rejections),
            "billable_runs": c["billable_runs"],
            "active_tasks": len(self.active),
            "callbacks_dropped": c["callbacks_dropped"],
            "callback_attempts": c["callback_attempts"],
            "auth_failures": c["auth_failures"],
            "list_calls": c["list_calls"],
            "delete_calls": c["delete_calls"],
            "upload_calls": c["upload_calls"],
            "outputs_stored": len(self.outputs),
        }

    def task_record(self, taskid: str) -> dict[str, Any] | None:
        task = self.tasks.get(taskid)
        if task is None:
            return None
        now = time.monotonic()
        self._mark_billable(task, now)
        return task.internal(now, self.config.public_url)


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
