"""``headshot-gateway upstream-check``: what the real Wiro API does, with the operator's keys.

The gateway is built on assumptions about Wiro that only the live API can settle
(``../shared/docs/wiro-api.md``, "What only real keys can settle"). This command checks
them and reports each as held / not held / unknown:

- without ``--run`` (free): reachability, the credentials, the project's auth mode
  (signature vs key only), the nonce, Task/List, whether its items carry
  ``callbackurl`` and whether they come by numeric id, descending. It sends Task/Detail
  for a task id that does not exist and Task/List, and classifies the answers (an
  authorization answer means "not held").
- with ``--run --yes`` (ONE REAL, BILLED TASK): File/Upload of a bundled sample portrait,
  Run with a callback URL under ``GATEWAY_PUBLIC_URL`` (a temporary listener on
  ``--listen`` catches the callback), Detail until the task ends, then the Run answer's
  shape, Detail's fields, the stages seen, Task/List for this task, the callback's
  method / content type / body shape, the output download and InputOutputDelete.

Secrets (API key and secret, signatures, socket tokens, the callback token) are never
printed. Exit status: 0 when nothing checked was "not held", 1 when something was,
2 when the command could not start (missing settings, ``--run`` without ``--yes``).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.catalog import DEFAULT_MODEL
from app.settings import Settings
from app.upstream_check._parts import (
    CALLBACK_PREFIX,
    CHECKS,
    HELD,
    LIST_QUERY,
    MAX_DOWNLOAD,
    NO_SUCH_TASK,
    NOT_HELD,
    RUN_CHECKS,
    SAMPLE_INPUTS,
    STATUSES,
    TERMINAL,
    UNKNOWN,
    CallbackCatcher,
    Check,
    Options,
    Raw,
    Report,
    _output_urls,
    _said,
    _same_url,
    _text,
    body_shape,
)
from app.wiro.client import WiroClient
from app.wiro.errors import WiroError, WiroStateError
from app.wiro.models import ids_descending

__all__ = ["CHECKS", "RUN_CHECKS", "Options", "add_parser", "check_upstream", "main"]


class UpstreamCheck:
    def __init__(self, settings: Settings, options: Options, http: httpx.AsyncClient) -> None:
        self.s, self.o, self.http = settings, options, http
        self.raw = Raw(http, settings)
        self.client = WiroClient(base_url=settings.wiro_base_url, api_key=settings.wiro_api_key,
                                 api_secret=settings.wiro_api_secret, http=http)  # fmt: skip
        self.checks = {name: Check(name) for name in CHECKS}
        self.mode = "signature" if self.raw.secret else "key_only"
        for name in RUN_CHECKS:
            self.checks[name].detail = "needs --run"

    def c(self, name: str) -> Check:
        return self.checks[name]

    async def run(self) -> Report:
        note = "not checked: an earlier check failed"
        try:
            if await self.probe():
                await self.task_list()
                if self.o.run:
                    await self.billed_run()
        except httpx.HTTPError as exc:  # a later call lost the connection
            note = f"not checked: Wiro stopped answering ({type(exc).__name__})"
        for c in self.checks.values():
            if c.verdict == UNKNOWN and not c.detail:
                c.detail = note
        return Report(self.s.wiro_base_url, self.mode, self.o.run, self.checks)

    # -- free checks -------------------------------------------------------------------

    async def probe(self) -> bool:
        """Reachability, credentials, auth mode, nonce. True when calls are accepted."""
        try:
            primary = await self.raw.post("/Task/Detail", {"taskid": NO_SUCH_TASK})
        except httpx.HTTPError as exc:
            self.c("reachable").set(NOT_HELD, f"no answer: {type(exc).__name__}")
            return False
        self.c("reachable").set(
            HELD if primary.body is not None else NOT_HELD,
            f"Task/Detail answered HTTP {primary.status}"
            + ("" if primary.body is not None else " without a JSON object"),
            http_status=primary.status,
        )
        if primary.body is None:
            return False
        accepted = not primary.auth_refused()
        bare = primary if self.mode == "key_only" else await self.raw.post(
            "/Task/Detail", {"taskid": NO_SUCH_TASK}, signed=False)  # fmt: skip
        bare_ok = not bare.auth_refused()
        _, bare_message = bare.error()
        project = "key_accepted" if bare_ok else "unknown"
        if not bare_ok and "signature" in bare_message.lower():
            project = "signature"

        nonce = self.c("nonce")
        if self.mode == "signature" and not accepted:
            # A wrong secret and a nonce format the server dislikes look the same: try
            # once with unix seconds, the other format Wiro's docs name.
            seconds = str(int(time.time()))
            retry = await self.raw.post("/Task/Detail", {"taskid": NO_SUCH_TASK}, nonce=seconds)
            if not retry.auth_refused():
                accepted = True
                nonce.set(NOT_HELD, "millisecond nonces refused, unix seconds accepted",
                          accepted_format="unix seconds")  # fmt: skip
        auth = self.c("auth")
        if accepted:
            auth.set(HELD, f"credentials accepted (Task/Detail for a missing task: "
                           f"{_said(primary)})", probe=primary.summary())  # fmt: skip
        else:
            auth.set(NOT_HELD, f"refused: {_said(primary)}", probe=primary.summary())

        mode = self.c("auth_mode")
        facts = {"configured": self.mode, "project": project, "bare_key_accepted": bare_ok}
        if self.mode == "key_only":
            if bare_ok:
                mode.set(HELD, "key-only requests are accepted", **facts)
            elif project == "signature":
                mode.set(NOT_HELD, "the project requires signatures: set "
                                   "GATEWAY_WIRO_API_SECRET", **facts)  # fmt: skip
            else:
                mode.set(UNKNOWN, "key-only requests refused; see auth", **facts)
        elif accepted:
            note = ("; the key alone is accepted too (signatures not enforced)" if bare_ok
                    else "; the key alone is refused")  # fmt: skip
            mode.set(HELD, "signed requests accepted" + note, **facts)
        elif bare_ok:
            mode.set(
                NOT_HELD,
                "signed requests refused but the key alone is accepted: a "
                "key-only project (unset GATEWAY_WIRO_API_SECRET)",
                **facts,
            )
        elif project == "signature":
            mode.set(HELD, "the project is in signature mode (the signature is wrong: see "
                           "auth)", **facts)  # fmt: skip
        else:
            mode.set(UNKNOWN, "every request refused; see auth", **facts)

        if self.mode == "key_only":
            nonce.set(UNKNOWN, "key-only mode: no nonce is sent")
        elif nonce.verdict == UNKNOWN:
            if accepted:
                replay = await self._replay_rejected()
                nonce.set(HELD, "millisecond counter nonces accepted"
                          + {True: "; a reused nonce is refused",
                             False: "; a reused nonce is accepted too",
                             None: ""}[replay],
                          replay_rejected=replay)  # fmt: skip
            else:
                nonce.set(UNKNOWN, "no signed request was accepted")
        return accepted

    async def _replay_rejected(self) -> bool | None:
        fixed = str(self.raw.nonces.next())
        first = await self.raw.post("/Task/Detail", {"taskid": NO_SUCH_TASK}, nonce=fixed)
        if first.auth_refused():
            return None
        return (await self.raw.post("/Task/Detail", {"taskid": NO_SUCH_TASK},
                                    nonce=fixed)).auth_refused()  # fmt: skip

    async def task_list(self, *, ours: str | None = None, callback_url: str = "") -> None:
        try:
            answer = await self.raw.post("/Task/List", LIST_QUERY)
        except httpx.HTTPError as exc:
            self.c("task_list").set(UNKNOWN, f"no answer: {type(exc).__name__}")
            return
        items = (answer.body or {}).get("tasklist")
        if not answer.ok or not isinstance(items, list):
            self.c("task_list").set(NOT_HELD, f"Task/List: {_said(answer)}", **answer.summary())
            self.c("task_list_callbackurl").set(UNKNOWN, "Task/List not usable")
            self.c("task_list_order").set(UNKNOWN, "Task/List not usable")
            return
        tasks = [t for t in items if isinstance(t, dict)]
        self.c("task_list").set(HELD, f"{len(tasks)} recent task(s) listed", items=len(tasks))
        self._order([str(t.get("id", "")) for t in tasks])
        line = self.c("task_list_callbackurl")
        if ours is not None:
            mine = next((t for t in tasks if str(t.get("id")) == ours), None)
            if mine is None:
                line.set(UNKNOWN, "this run's task is not on Task/List's first page",
                         found=False)  # fmt: skip
            elif "callbackurl" not in mine:
                line.set(NOT_HELD, "this run's task is listed without callbackurl", found=True)
            else:
                same = _same_url(mine.get("callbackurl"), callback_url)
                line.set(HELD if same else NOT_HELD,
                         "listed with the callback URL sent" if same
                         else "listed with a different callbackurl", found=True)  # fmt: skip
            return
        if not tasks:
            line.set(UNKNOWN, "no task listed yet (--run makes one)")
        with_key = sum("callbackurl" in t for t in tasks)
        if tasks and with_key == len(tasks):
            line.set(HELD, "every listed task has callbackurl")
        elif tasks:
            line.set(NOT_HELD, f"{len(tasks) - with_key} of {len(tasks)} listed tasks lack "
                               "callbackurl")  # fmt: skip

    def _order(self, ids: list[str]) -> None:
        """Whether Task/List is in the order asked for (by id, descending) with numeric
        ids: what lets the gateway end a search at an anchor (a task accepted before
        the lost Run was sent), or by Wiro's clock (``app.tasks._look.newest_first``)."""
        line = self.c("task_list_order")
        if len(ids) < 2:
            line.set(UNKNOWN, "fewer than two tasks listed: no order to see", items=len(ids))
        elif ids_descending(ids):
            line.set(HELD, "numeric ids, highest (newest) first", items=len(ids))
        else:
            line.set(NOT_HELD, "ids not numeric or not descending: no anchor ends the "
                               "gateway's Task/List search, nor Wiro's clock where numeric "
                               "ids are out of order", first_ids=ids[:5])  # fmt: skip

    # -- the billed run ----------------------------------------------------------------

    async def billed_run(self) -> None:
        for name in RUN_CHECKS:
            self.c(name).detail = ""
        token = secrets.token_urlsafe(18)
        path = CALLBACK_PREFIX + token
        base = (self.o.callback_base or self.s.public_url).rstrip("/")
        callback_url = base + path
        catcher = CallbackCatcher(self.o.listen_host, self.o.listen_port, path)
        try:
            await catcher.__aenter__()
        except OSError as exc:
            self.c("callback").set(UNKNOWN, f"could not listen on {self.o.listen_host}:"
                                            f"{self.o.listen_port} ({type(exc).__name__}): "
                                            "no task was started")  # fmt: skip
            return
        try:
            await self._run_with(catcher, callback_url)
        finally:
            await catcher.__aexit__(None, None, None)

    async def _run_with(self, catcher: CallbackCatcher, callback_url: str) -> None:
        from app.simulator.images import sample_portrait

        try:
            input_url = await self.client.upload(filename="upstream-check.jpg",
                                                 content=sample_portrait(),
                                                 content_type="image/jpeg")  # fmt: skip
        except WiroError as exc:
            self.c("upload").set(NOT_HELD, f"File/Upload: {exc.message[:200]}")
            return
        self.c("upload").set(HELD, f"sample portrait uploaded ({urlsplit(input_url).hostname})")

        model = "/Run/" + DEFAULT_MODEL
        body = {"inputImageUrl": input_url, **SAMPLE_INPUTS, "callbackUrl": callback_url}
        try:
            answer = await self.raw.post(model, body)
        except httpx.HTTPError as exc:
            self.c("run_answer").set(UNKNOWN, f"no answer ({type(exc).__name__}): a task may "
                                              "exist; look at Wiro's dashboard")  # fmt: skip
            return
        task_id = _text((answer.body or {}).get("taskid"))
        token = _text((answer.body or {}).get("socketaccesstoken"))
        keys = sorted(answer.body or {})
        if answer.ok and task_id and token:
            self.c("run_answer").set(HELD, "result true with taskid and socketaccesstoken",
                                     keys=keys)  # fmt: skip
        else:
            self.c("run_answer").set(NOT_HELD, f"Run: {_said(answer)}", keys=keys,
                                     **answer.summary())  # fmt: skip
        if not task_id:
            return

        final = await self._follow(task_id)
        if final is None:
            return
        token = token or _text(final.get("socketaccesstoken"))
        self._judge_detail(final, callback_url)
        await self.task_list(ours=task_id, callback_url=callback_url)
        await self._download(final)
        await self._callback(catcher, task_id)
        if token:
            await self._delete(token)
        else:
            self.c("input_output_delete").set(UNKNOWN, "no task token to delete with")

    async def _follow(self, task_id: str) -> dict[str, Any] | None:
        """Detail until the task ends (or the wait is over, then it is stopped)."""
        seen: list[str] = []
        deadline = time.monotonic() + self.o.wait_s
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            try:
                task = await self.client.detail(task_id=task_id)
            except WiroStateError:
                task = None  # "There is no task yet." just after Run
            except WiroError:
                task = None
            if task is not None:
                last = task.raw
                if not seen or seen[-1] != task.status:
                    seen.append(task.status)
                if task.status in TERMINAL:
                    break
            await asyncio.sleep(self.o.poll_s)
        stages = self.c("stages")
        unknown = [s for s in seen if s not in STATUSES]
        if not seen or seen[-1] not in TERMINAL:
            stopped = await self._stop(task_id)
            stages.set(UNKNOWN, f"the task did not end within {self.o.wait_s:g} s ({stopped})",
                       seen=seen)  # fmt: skip
            return None
        if unknown:
            stages.set(NOT_HELD, f"undocumented statuses: {', '.join(unknown)}", seen=seen)
        elif seen[-1] != "task_postprocess_end":
            stages.set(NOT_HELD, f"ended in {seen[-1]}", seen=seen)
        else:
            stages.set(HELD, " > ".join(seen), seen=seen)
        return last

    async def _stop(self, task_id: str) -> str:
        for verb in ("kill", "cancel"):
            try:
                await getattr(self.client, verb)(task_id)
                return f"stopped with Task/{verb.capitalize()}"
            except WiroError:
                continue
        return "could not stop it: look at Wiro's dashboard"

    def _judge_detail(self, task: dict[str, Any], callback_url: str) -> None:
        succeeded_by_outputs = bool(_output_urls(task))
        pexit = self.c("detail_pexit")
        if "pexit" not in task:
            pexit.set(NOT_HELD, "a finished task's Detail has no pexit (judge by outputs)",
                      present=False)  # fmt: skip
        elif _text(task.get("pexit")) is None:
            pexit.set(NOT_HELD, "pexit is empty on a finished task", present=True, value="")
        else:
            value = str(task["pexit"])
            pexit.set(HELD, f"pexit {value!r}", present=True, value=value)
        outputs = self.c("detail_outputs")
        if succeeded_by_outputs:
            count = len(_output_urls(task))
            outputs.set(HELD, f"{count} output(s) with a url", count=count)
        else:
            outputs.set(NOT_HELD, "no output with a url", count=0)
        cost = self.c("detail_totalcost")
        raw_cost = task.get("totalcost")
        try:
            amount = Decimal(str(raw_cost)) if raw_cost is not None else None
        except InvalidOperation:
            amount = None
        if amount is None:
            cost.set(NOT_HELD, "totalcost missing or not a number", present="totalcost" in task)
        else:
            cost.set(HELD, f"totalcost {raw_cost} USD", value=str(raw_cost))
        cb = self.c("detail_callbackurl")
        if "callbackurl" not in task:
            cb.set(NOT_HELD, "Detail has no callbackurl", present=False)
        elif _same_url(task.get("callbackurl"), callback_url):
            cb.set(HELD, "callbackurl is the URL sent", present=True)
        else:
            cb.set(NOT_HELD, "callbackurl differs from the URL sent", present=True)

    async def _download(self, task: dict[str, Any]) -> None:
        line = self.c("output_download")
        urls = _output_urls(task)
        if not urls:
            line.set(UNKNOWN, "no output URL")
            return
        try:
            response = await self.http.get(urls[0], follow_redirects=True)
        except httpx.HTTPError as exc:
            line.set(NOT_HELD, f"GET failed: {type(exc).__name__}")
            return
        facts = {"http_status": response.status_code, "host": urlsplit(urls[0]).hostname,
                 "content_type": response.headers.get("content-type", ""),
                 "bytes": len(response.content)}  # fmt: skip
        if response.status_code != 200 or len(response.content) > MAX_DOWNLOAD:
            line.set(NOT_HELD, f"GET answered HTTP {response.status_code}", **facts)
            return
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(response.content)) as image:
                image.load()
                facts |= {"format": image.format, "size": list(image.size)}
        except (UnidentifiedImageError, OSError):
            line.set(NOT_HELD, "downloaded, but not an image", **facts)
            return
        line.set(HELD, f"{facts['format']} {facts['size'][0]}x{facts['size'][1]}, "
                       f"{facts['bytes']} bytes", **facts)  # fmt: skip

    async def _callback(self, catcher: CallbackCatcher, task_id: str) -> None:
        try:
            await asyncio.wait_for(catcher.arrived.wait(), self.o.callback_wait_s)
        except TimeoutError:
            msg = (
                f"none within {self.o.callback_wait_s:g} s of the end (is "
                "GATEWAY_PUBLIC_URL reachable from Wiro and routed to --listen?)"
            )
            self.c("callback").set(UNKNOWN, msg)
            self.c("callback_body").set(UNKNOWN, "no callback arrived")
            return
        first = catcher.caught[0]
        ctype = first.content_type.split(";")[0].strip().lower()
        facts = {"method": first.method, "content_type": ctype, "count": len(catcher.caught)}
        line = self.c("callback")
        if first.method == "POST":
            line.set(HELD, f"POST, {ctype or 'no content type'}", **facts)
        else:
            line.set(NOT_HELD, f"{first.method}, not POST", **facts)
        shape = body_shape(first, task_id)
        body = self.c("callback_body")
        if shape["shape"] in ("detail", "tasklist") and ctype == "application/json":
            body.set(HELD, f"JSON task object ({shape['shape']})", content_type=ctype, **shape)
        else:
            body.set(NOT_HELD, f"{shape['shape']} body, {ctype or 'no content type'} (the "
                               "gateway only takes it as a hint)", content_type=ctype,
                     **shape)  # fmt: skip

    async def _delete(self, token: str) -> None:
        line = self.c("input_output_delete")
        try:
            first = await self.raw.post("/Task/InputOutputDelete", {"tasktoken": token})
            again = await self.raw.post("/Task/InputOutputDelete", {"tasktoken": token})
        except httpx.HTTPError as exc:
            line.set(UNKNOWN, f"no answer: {type(exc).__name__}")
            return
        gone = again.ok or again.error() == (1, "task-not-exist")
        facts = {"first": first.summary(), "again": again.summary()}
        if first.ok and gone:
            line.set(
                HELD,
                "accepted; a second delete answers "
                + ("success" if again.ok else '"task-not-exist"'),
                **facts,
            )
        elif first.ok:
            line.set(NOT_HELD, f"accepted; a second delete answers {_said(again)}", **facts)
        else:
            line.set(NOT_HELD, f"refused: {_said(first)}", **facts)


async def check_upstream(settings: Settings, options: Options,
                         http: httpx.AsyncClient | None = None) -> Report:  # fmt: skip
    """Run the checks; ``http`` (optional) is the client to use, else one is made."""
    if http is not None:
        return await UpstreamCheck(settings, options, http).run()
    timeout = httpx.Timeout(
        connect=settings.wiro_connect_timeout_s,
        read=max(settings.wiro_read_timeout_s, 60.0),
        write=60.0,
        pool=5.0,
    )
    async with httpx.AsyncClient(
        timeout=timeout, headers={"user-agent": "headshot-gateway upstream-check"}
    ) as client:
        return await UpstreamCheck(settings, options, client).run()


def main(args: Any, settings_factory: Callable[[], Settings]) -> int:
    """The CLI command (wired in app/cli.py)."""
    import sys

    try:
        settings = settings_factory()
    except Exception as exc:  # pydantic's message, never a secret (hide_input_in_errors)
        print(f"upstream-check: settings: {exc}", file=sys.stderr)
        return 2
    if settings.wiro_api_key is None:
        print("upstream-check: GATEWAY_WIRO_API_KEY is not set", file=sys.stderr)
        return 2
    if args.run and not args.yes:
        print(
            "upstream-check: --run starts ONE REAL, BILLED task at Wiro (one headshot of "
            "a sample portrait). Add --yes to go ahead.",
            file=sys.stderr,
        )
        return 2
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print("upstream-check: --listen takes HOST:PORT", file=sys.stderr)
        return 2
    options = Options(run=args.run, listen_host=host, listen_port=int(port),
                      callback_base=args.callback_base, wait_s=args.wait,
                      callback_wait_s=args.callback_wait, poll_s=args.poll)  # fmt: skip
    if args.run:
        print("upstream-check: starting one billed task at Wiro", file=sys.stderr)
    report = asyncio.run(check_upstream(settings, options))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
    return 0 if report.ok else 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "upstream-check", help="check what the gateway assumes about Wiro, with your keys"
    )
    p.add_argument(
        "--run", action="store_true", help="also run ONE REAL, BILLED task (needs --yes)"
    )
    p.add_argument("--yes", action="store_true", help="agree to the billed task of --run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        help="HOST:PORT of the temporary callback listener GATEWAY_PUBLIC_URL "
        "reaches (default 127.0.0.1:8000)",
    )
    p.add_argument(
        "--callback-base",
        default=None,
        help="base of the callback URL (default GATEWAY_PUBLIC_URL)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="seconds to wait for the task to end (then it is stopped)",
    )
    p.add_argument(
        "--callback-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the callback once the task has ended",
    )
    p.add_argument("--poll", type=float, default=3.0, help="seconds between Detail calls")
