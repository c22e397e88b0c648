"""What the simulator does: the Wiro calls, task drivers, stores, stats.

Every task gets one driver (an asyncio task) that wakes when its queue time is over,
fetches and renders the input in a thread, sleeps until the planned end and then
finishes the task and fires its callback (callbacks.py). Status between those points is
computed from the clock (see ``state.py``), so Detail is exact without a polling loop.
Error bodies, auth and Run's validation are in ``wire.py``.

All state lives on one event loop; a check-then-set with no ``await`` in between is
therefore atomic, which is what makes the Kill/completion race well defined.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import string
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.http_pool import KEEPALIVE_EXPIRY_S, PoolTransport
from app.simulator import images
from app.simulator.callbacks import CALLBACK_TIMEOUT_S, USER_AGENT, Callbacks
from app.simulator.config import SimConfig
from app.simulator.state import (
    CANCELLABLE,
    MODEL,
    TERMINAL,
    Fate,
    SimFile,
    SimOutput,
    SimTask,
)
from app.simulator.wire import (
    NO_TASK,
    NOT_DELETABLE,
    SERVER_ERROR,
    TASK_NOT_EXIST,
    NonceBook,
    WiroFail,
    check_auth,
    normalize_fields,
    parsing_url,
    validate_run,
)

__all__ = ["MAX_UPLOAD_BYTES", "RunOutcome", "Simulator", "WiroFail", "normalize_fields"]

log = logging.getLogger("app.simulator")
# httpx's default limits; idle connections retired before the gateway's server (uvicorn,
# 5 s) closes them, as the gateway's own clients do.
_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S
)

MAX_TASKS = 20_000  # oldest finished tasks are forgotten beyond this
PRUNE_SLACK = 500  # Runs between two looks for finished tasks to forget (``_prune_tasks``)
MAX_OUTPUTS = 2_000
MAX_FILES = 500
MAX_FILES_BYTES = 512 * 1024 * 1024
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MAX_INPUT_BYTES = 100 * 1024 * 1024
INPUT_TIMEOUT_S = 10.0
FAIL_MESSAGE = "RuntimeError: CUDA out of memory"

_GATEWAY_TASK = re.compile(r"/callbacks/wiro/([^/?#]+)/")
_TOKEN_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class RunOutcome:
    body: dict[str, Any]
    drop_connection: bool


def _token(n: int = 30) -> str:
    """``n`` characters of ``_TOKEN_CHARS``, each text equally likely: one draw below
    62**n written in base 62 (one ``getrandom`` call, where a ``secrets.choice`` per
    character made one each: ~55 µs of every Run's CPU)."""
    value = secrets.randbelow(len(_TOKEN_CHARS) ** n)
    chars = []
    for _ in range(n):
        value, digit = divmod(value, len(_TOKEN_CHARS))
        chars.append(_TOKEN_CHARS[digit])
    return "".join(chars)


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
        self._pool: PoolTransport | None = None
        self._next_id = int(time.time() * 1000)  # distinct across restarts
        self._background: set[asyncio.Task[Any]] = set()
        self._nonces = NonceBook()
        self.callbacks = Callbacks(self)
        self.sample_jpeg = images.sample_portrait()
        self.files: OrderedDict[str, SimFile] = OrderedDict()
        self._files_bytes = 0
        self._forget()

    def _forget(self) -> None:
        self.tasks: dict[str, SimTask] = {}
        self._prune_at = MAX_TASKS + PRUNE_SLACK  # ``_prune_tasks`` looks past this many
        self.by_token: dict[str, SimTask] = {}
        self.active: set[str] = set()  # counted against max_concurrency
        self.outputs: OrderedDict[str, SimOutput] = OrderedDict()
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.runs_by_gateway: Counter[str] = Counter()

    # -- plumbing ------------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            # The gateway's transport (``app.http_pool``): httpx's own pool looks at each
            # connection for each queued request on every assignment, and with callbacks
            # queued behind a slow gateway that was ~30 % of the simulator's samples, on the
            # cores the gateway under test shares (docs/benchmarks.md, forty-first round).
            self._pool = PoolTransport(limits=_LIMITS, trust_env=True)
            self._http = httpx.AsyncClient(
                transport=self._pool,
                timeout=CALLBACK_TIMEOUT_S,
                headers={"user-agent": USER_AGENT},
            )
            self._owns_http = True
        return self._http

    @property
    def pool(self) -> PoolTransport | None:
        """The transport under the simulator's own client, which callbacks use straight;
        None when it was given a client (tests)."""
        if self._owns_http:
            self.http  # noqa: B018 (made on first use)
        return self._pool

    def draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def wire(self, task: SimTask, at: float) -> dict[str, Any]:
        """The task as Detail shows it at ``at``, in the configured shape."""
        return task.to_wire(at, self.config.public_url, omit_pexit=self.config.omit_pexit)

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
            self._pool = None

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
        try:
            check_auth(self.config, headers, self._nonces)
        except WiroFail:
            self.counters["auth_failures"] += 1
            raise

    # -- Run -----------------------------------------------------------------------------

    def _server_error_due(self, cfg: SimConfig) -> bool:
        """The next Run gets the code-0 server error: counted down, else drawn."""
        if cfg.run_server_error_count > 0:
            cfg.run_server_error_count -= 1
            return True
        return self.draw(cfg.run_server_error_rate)

    async def run(self, owner: str, model: str, fields: dict[str, str]) -> RunOutcome:
        self.counters["run_calls"] += 1
        cfg = self.config
        try:
            if (owner, model) != MODEL:
                raise WiroFail(1, "slug-owner-project-not-exist")
            if self.draw(cfg.run_429_rate):
                raise WiroFail(
                    0, "Too many requests.", http_status=429, headers={"Retry-After": "1"}
                )
            if self.draw(cfg.run_5xx_rate):
                raise WiroFail(0, "Internal server error.", http_status=500)
            if self._server_error_due(cfg):
                self.counters["run_server_errors"] += 1
                raise WiroFail(0, SERVER_ERROR, http_status=cfg.run_server_error_status)
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
            await self.callbacks.post(task, self.wire(task, task.created_mono), kind="early",
                                      retries=0)  # fmt: skip
        if cfg.run_hang_s > 0:
            await asyncio.sleep(cfg.run_hang_s)
        body = {"errors": [], "taskid": task.id, "socketaccesstoken": task.token, "result": True}
        return RunOutcome(body, cfg.run_drop_connection)

    def _create(self, cfg: SimConfig, params: dict[str, str], callback: str) -> SimTask:
        fate = Fate.OK
        if self.draw(cfg.lost_rate):
            fate = Fate.LOST
        elif self.draw(cfg.stuck_rate):
            fate = Fate.STUCK
        elif self.draw(cfg.fail_rate):
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
        self.spawn(self._drive(task))
        self._prune_tasks()
        return task

    def _prune_tasks(self) -> None:
        """Forget the oldest finished tasks beyond ``MAX_TASKS``, looking at most once per
        ``PRUNE_SLACK`` new tasks. Unfinished tasks are never forgotten, so a look can
        leave more than ``MAX_TASKS``; the next waits until ``PRUNE_SLACK`` more came.
        (Looking on every Run while more than ``MAX_TASKS`` were unfinished, as P12's
        hour-long queued tasks are, cost a scan of them all per Run: milliseconds each
        at 20,000, enough to slow every Run and wedge P12's later rounds.)"""
        if len(self.tasks) <= self._prune_at:
            return
        self._forget_finished()
        self._prune_at = max(MAX_TASKS, len(self.tasks)) + PRUNE_SLACK

    def _forget_finished(self) -> None:
        for task in list(self.tasks.values()):
            if len(self.tasks) <= MAX_TASKS:
                break
            if task.fate == Fate.LOST or task.ended_at is not None:
                del self.tasks[task.id]
                self.by_token.pop(task.token, None)

    # -- the task driver -----------------------------------------------------------------

    async def _drive(self, task: SimTask) -> None:
        try:
            await _sleep_until(task.run_at)
            if task.cancelled_at is not None or task.fate in (Fate.LOST, Fate.STUCK):
                return
            rendered: images.RenderedImage | None = None
            failure = FAIL_MESSAGE if task.fate == Fate.FAIL else ""
            if not failure:
                try:
                    data = await self._load_input(task.parameters["inputImageUrl"])
                    options = {
                        "background": task.parameters["background"],
                        "aspect_ratio": task.parameters["aspectRatio"],
                        "output_format": task.parameters["outputFormat"],
                    }
                    # A rendering already held costs no hop to a thread (each was ~6 %
                    # of the simulator's samples at 200 task lives/s).
                    rendered = images.cached(data, **options) or await asyncio.to_thread(
                        images.render_cached, data, **options
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
            self.counters["billable_runs"] += 1
        else:
            task.pexit = "1"
            task.failure = failure or FAIL_MESSAGE
        task.finished_at = now
        self.active.discard(task.id)
        self.callbacks.on_terminal(task)

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
        if self.draw(self.config.detail_5xx_rate):
            raise WiroFail(0, "Internal server error.", http_status=500)
        task = self._find(fields)
        wire = self.wire(task, time.monotonic())
        return {"total": "1", "errors": [], "tasklist": [wire], "result": True}

    def cancel(self, fields: dict[str, str]) -> dict[str, Any]:
        """Task/Cancel: only while queued (task_queue, task_accept)."""
        self.counters["cancel_calls"] += 1
        task = self._find(fields)
        now = time.monotonic()
        if task.status_at(now) not in CANCELLABLE:
            raise WiroFail(1, "Task is not in a cancellable state.")
        return self._stop(task, now, "cancel")

    def kill(self, fields: dict[str, str]) -> dict[str, Any]:
        """Task/Kill (by taskid or socketaccesstoken): once past the queue, until the end."""
        self.counters["kill_calls"] += 1
        task = self._find(fields)
        now = time.monotonic()
        status = task.status_at(now)
        if status in CANCELLABLE or status in TERMINAL:
            raise WiroFail(1, "Task could not be killed: task is not running")
        return self._stop(task, now, "kill")

    def _stop(self, task: SimTask, now: float, kind: str) -> dict[str, Any]:
        task.cancelled_at = now
        task.cancel_kind = kind
        self.active.discard(task.id)
        self.callbacks.on_terminal(task)
        return {"errors": [], "tasklist": [self.wire(task, now)], "result": True}

    def input_output_delete(self, fields: dict[str, str]) -> dict[str, Any]:
        """Documented answers: "task-not-exist" for an unknown or already cleaned task."""
        self.counters["delete_calls"] += 1
        token = fields.get("tasktoken") or fields.get("socketaccesstoken") or ""
        taskid = fields.get("taskid", "")
        if not token and not taskid:
            raise WiroFail(0, "Request parameter [tasktoken] required")
        task = self.by_token.get(token) if token else self.tasks.get(taskid)
        if task is None or task.fate == Fate.LOST or task.outputs_deleted:
            raise WiroFail(1, TASK_NOT_EXIST)
        if not task.is_terminal(time.monotonic()):
            raise WiroFail(1, NOT_DELETABLE)
        for output in task.outputs:
            self.outputs.pop(output.folder, None)
            output.data = b""
        task.outputs_deleted = True
        return {"result": True, "errors": []}

    def list_tasks(self, fields: dict[str, str]) -> dict[str, Any]:
        """Task/List: the project's tasks, newest first unless ``order`` is ASC."""
        cfg = self.config
        if not cfg.task_list_enabled:
            raise parsing_url()
        self.counters["list_calls"] += 1
        start = max(0, _int(fields.get("start"), 0))
        limit = min(1000, max(1, _int(fields.get("limit"), 20)))
        visible = [t for t in self.tasks.values() if t.fate != Fate.LOST]
        if fields.get("order", "DESC").upper() != "ASC" and not cfg.task_list_ignores_order:
            visible.reverse()
        now = time.monotonic()
        page = [self.wire(t, now) for t in visible[start : start + limit]]
        if not cfg.task_list_callbackurl:
            for item in page:
                del item["callbackurl"]
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
        billable: Counter[str] = Counter()
        killed: Counter[str] = Counter()
        for task in self.tasks.values():
            statuses["lost" if task.fate == Fate.LOST else task.status_at(now)] += 1
            gateway_task = task.gateway_task_id
            if gateway_task and task.billable:
                billable[gateway_task] += 1
            if gateway_task and task.cancel_kind is not None:
                killed[gateway_task] += 1
        c = self.counters
        return {
            "runs": c["runs"],
            "runs_by_gateway_task": dict(self.runs_by_gateway),
            # Billed like Wiro's pricing page: finished with pexit "0" (forgotten tasks,
            # beyond MAX_TASKS, are no longer counted here; billable_runs keeps them).
            "billable_by_gateway_task": {g: billable[g] for g in self.runs_by_gateway},
            "stopped_by_gateway_task": {g: killed[g] for g in self.runs_by_gateway if killed[g]},
            "detail_calls": c["detail_calls"],
            "cancel_calls": c["cancel_calls"],
            "kill_calls": c["kill_calls"],
            "callbacks_sent": c["callbacks_sent"],
            "callbacks_failed": c["callbacks_failed"],
            "status_counts": dict(statuses),
            # Extras beyond the brief.
            "run_calls": c["run_calls"],
            "tasks_created": c["runs"],
            "run_rejections": dict(self.rejections),
            "run_server_errors": c["run_server_errors"],
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
        cfg = self.config
        return task.internal(time.monotonic(), cfg.public_url, omit_pexit=cfg.omit_pexit)

    def task_records(self, gateway_task: str | None = None) -> list[dict[str, Any]]:
        """Every task's record, oldest first; only one gateway task's when given."""
        now, cfg = time.monotonic(), self.config
        return [
            t.internal(now, cfg.public_url, omit_pexit=cfg.omit_pexit)
            for t in self.tasks.values()
            if gateway_task is None or t.gateway_task_id == gateway_task
        ]


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
