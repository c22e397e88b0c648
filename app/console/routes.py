"""The console's routes: thin, like the API's — parse, call the same domain functions the
API calls (``app.tasks`` and friends), render.

Every page resolves the viewer from the session cookie through the API's own key
resolution, and passes ``viewer.scope`` to the domain functions exactly as the API passes
``caller.scope``: another client's task is a 404 here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import RedirectResponse, Response

from app import live, tasks
from app.api.deps import (
    ctx_of,
    get_ctx,
    get_hub,
    principal_for_digest,
    principal_for_key,
)
from app.api.streaming import EventStream
from app.clients import key_digest
from app.console import extras
from app.console.filters import DEFAULT_LIMIT, LIMITS, Filters, history_args
from app.console.render import STATIC, error_page, render, secure
from app.console.sessions import close_session, csrf_matches, find_session, open_session
from app.context import Ctx
from app.errors import GatewayError, InvalidRequest, NotFound, TooManyRequests, Unauthorized
from app.lifecycle import Status
from app.models import ConsoleSession
from app.outbox import Services
from app.schemas import event_out
from app.wakeup import Hub, TooManyWaiters

COOKIE = "hgw_console"


class SignInRequired(Exception):
    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "")
        self.message = message


class CsrfRejected(Exception):
    pass


class ConsoleRoute(APIRoute):
    """Console errors are pages, not problem+json: a missing session redirects to the
    sign-in page, domain errors (404, 409, 422) render an error page, and every answer
    carries the console's security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return secure(await handler(request))
            except SignInRequired as e:
                query = {"next": _here(request)} if request.method == "GET" else {}
                if e.message:
                    query["expired"] = "1"
                return secure(
                    RedirectResponse(
                        "/console/sign-in" + (f"?{urlencode(query)}" if query else ""), 303
                    )
                )
            except CsrfRejected:
                return error_page(
                    403,
                    "Form expired",
                    "This form was not sent from a page of this console "
                    "session. Go back, reload the page and try again.",
                )
            except NotFound:
                return error_page(
                    404,
                    "Not found",
                    "There is no such task, or it is not yours to see.",
                    context=_viewer_context(request),
                )
            except GatewayError as e:
                return error_page(e.status, e.title, e.detail, context=_viewer_context(request))
            except RequestValidationError:
                return error_page(
                    422,
                    "Invalid address",
                    "The address has a value the console cannot read.",
                    context=_viewer_context(request),
                )

        return guarded


router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)


def _here(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


# ---------------------------------------------------------------- who is looking


@dataclass(frozen=True)
class Viewer:
    client: str
    admin: bool
    scope: str | None  # what the API calls caller.scope
    session: ConsoleSession

    @property
    def csrf(self) -> str:
        return self.session.csrf_token


async def viewer(request: Request) -> Viewer:
    ctx = ctx_of(request)
    token = request.cookies.get(COOKIE, "")
    session = await find_session(ctx, token=token) if token else None
    if session is None:
        raise SignInRequired("expired" if token else None)
    try:
        who = await principal_for_digest(request, bytes.fromhex(session.key_hash))
    except Unauthorized:
        await close_session(ctx, token=token)
        raise SignInRequired("key no longer valid") from None
    v = Viewer(client=who.client, admin=who.admin, scope=who.scope, session=session)
    request.state.console_viewer = v
    return v


def _viewer_context(request: Request) -> dict[str, Any]:
    v = getattr(request.state, "console_viewer", None)
    return {"viewer": v} if v else {}


def _same_origin(request: Request) -> bool:
    """Browsers send Origin on every form POST; one from elsewhere is a forgery."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = urlsplit(origin).netloc
    public = urlsplit(ctx_of(request).settings.public_url).netloc
    return host in (request.headers.get("host"), public)


async def checked_viewer(request: Request, csrf: Annotated[str, Form()] = "") -> Viewer:
    """A POST from this console: signed in, same origin, and the session's CSRF token."""
    v = await viewer(request)
    if not _same_origin(request) or not csrf_matches(v.session, csrf):
        raise CsrfRejected
    return v


Looker = Annotated[Viewer, Depends(viewer)]
Actor = Annotated[Viewer, Depends(checked_viewer)]
Context = Annotated[Ctx, Depends(get_ctx)]


async def get_services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


Svc = Annotated[Services, Depends(get_services)]


def _cookie_secure(ctx: Ctx) -> bool:
    return ctx.settings.public_url.lower().startswith("https://")


def _safe_next(value: str | None) -> str:
    """Only a console path: never an open redirect."""
    if (
        value
        and value.startswith("/console/")
        and not value.startswith("//")
        and "\\" not in value
        and "sign-" not in value
    ):
        return value
    return "/console/tasks"


# ---------------------------------------------------------------- sign in and out


@router.get("")
@router.get("/")
async def home() -> Response:
    return RedirectResponse("/console/tasks", 303)


@router.get("/sign-in")
async def sign_in_page(
    next: str | None = None, expired: str | None = None, out: str | None = None
) -> Response:
    notice = None
    if expired:
        notice = {"kind": "info", "text": "Your session has ended. Sign in again."}
    elif out:
        notice = {"kind": "info", "text": "You are signed out."}
    return render(
        "sign_in.html", {"next": _safe_next(next), "notice": notice, "section": "sign-in"}
    )


@router.post("/sign-in")
async def sign_in(
    request: Request,
    ctx: Context,
    key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    if not _same_origin(request):
        raise CsrfRejected
    try:
        who = await principal_for_key(request, key.strip())
    except Unauthorized:
        return render(
            "sign_in.html",
            {
                "next": _safe_next(next),
                "section": "sign-in",
                "key_error": True,
                "notice": {
                    "kind": "error",
                    "text": "That key was not accepted. Check it and try again.",
                },
            },
            status_code=401,
        )
    opened = await open_session(ctx, key_digest=key_digest(key.strip()), client=who.client)
    response = RedirectResponse(_safe_next(next), 303)
    response.set_cookie(
        COOKIE,
        opened.token,
        max_age=12 * 3600,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(ctx),
    )
    return response


@router.post("/sign-out")
async def sign_out(request: Request, ctx: Context, me: Actor) -> Response:
    await close_session(ctx, token=request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/console/sign-in?out=1", 303)
    response.delete_cookie(
        COOKIE, path="/console", httponly=True, samesite="strict", secure=_cookie_secure(ctx)
    )
    return response


# ---------------------------------------------------------------- the task list


@router.get("/tasks")
async def task_list(
    me: Looker,
    ctx: Context,
    status: Annotated[list[str] | None, Query()] = None,
    client: Annotated[str, Query(max_length=100)] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    tz: Annotated[str, Query(max_length=64)] = "",
    meta_key: Annotated[str, Query(max_length=40)] = "",
    meta_value: Annotated[str, Query(max_length=500)] = "",
    limit: Annotated[int, Query(ge=1, le=200)] = DEFAULT_LIMIT,
    cursor: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    f = Filters(
        statuses=[s for s in (status or []) if s],
        client=client.strip(),
        date_from=date_from,
        date_to=date_to,
        tz=tz,
        meta_key=meta_key.strip(),
        meta_value=meta_value,
        limit=limit,
    )
    rows: list[Any] = []
    next_cursor = None
    error = None
    try:
        found, next_cursor = await tasks.list_tasks(
            ctx, **history_args(f, scope=me.scope, admin=me.admin), cursor=cursor or None
        )
        rows = [extras.present(ctx, t) for t in found]
    except InvalidRequest as e:
        error = e.detail
    return render(
        "tasks.html",
        {
            "viewer": me,
            "section": "tasks",
            "filters": f,
            "rows": rows,
            "statuses": [s.value for s in Status],
            "limits": LIMITS,
            "error": error,
            "next_href": f"/console/tasks?{f.query(cursor=next_cursor)}" if next_cursor else None,
            "first_href": f"/console/tasks?{f.query()}" if cursor else None,
        },
        status_code=422 if error else 200,
    )


# ---------------------------------------------------------------- one task


DONE = {
    "cancel": "Cancel requested. The task becomes cancelled once Wiro confirms "
    "(it may still finish if it was about to).",
    "redeliver": "The notification was queued for delivery again.",
    "erase": "The task's images were erased.",
}


async def _task_page(
    svc: Services,
    me: Viewer,
    task_id: str,
    *,
    notice: dict[str, str] | None,
    status_code: int = 200,
) -> Response:
    ctx = svc.ctx
    task = await tasks.get_task(ctx, task_id=task_id, client=me.scope)
    events = await tasks.list_events(ctx, task_id=task_id, client=me.scope)
    view = extras.present(ctx, task)
    deliveries = await extras.deliveries(svc, task_id=task_id, client=me.scope)
    return render(
        "task.html",
        {
            "viewer": me,
            "section": "tasks",
            "t": view,
            "notice": notice,
            "events": [event_out(e) for e in events],
            "deliveries": deliveries,
            # Where the live timeline continues (console.js follows it until terminal).
            "stream_cursor": live.encode_event_cursor(events[-1].id if events else 0),
            "can": extras.actions(view),
            "api_json": json.dumps(view.api.model_dump(mode="json"), indent=2, ensure_ascii=False),
        },
        status_code=status_code,
    )


@router.get("/tasks/{task_id}")
async def task_page(task_id: str, me: Looker, svc: Svc, done: str | None = None) -> Response:
    notice = {"kind": "ok", "text": DONE[done]} if done in DONE else None
    return await _task_page(svc, me, task_id, notice=notice)


@router.get("/tasks/{task_id}/events")
async def task_events(
    task_id: str,
    me: Looker,
    ctx: Context,
    hub: Annotated[Hub, Depends(get_hub)],
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)] = None,
) -> Response:
    """The task's live timeline for the task page (the API's event stream, behind the
    console's session instead of a bearer key: EventSource cannot send one)."""
    after = live.decode_event_cursor(cursor) if cursor else 0
    if last_event_id is not None:
        after = live.parse_last_event_id(last_event_id)
    try:
        watch = await live.open_stream(ctx, hub, task_id=task_id, scope=me.scope, client=me.client)
    except TooManyWaiters:
        raise TooManyRequests(
            "Too many open waits and streams for this client.", headers={"Retry-After": "5"}
        ) from None
    s = ctx.settings
    return secure(
        EventStream(
            live.follow(
                ctx,
                hub,
                watch,
                after=after,
                heartbeat_s=s.stream_heartbeat_s,
                reread_s=s.stream_reread_s,
            ),
            on_close=watch.close,
        )
    )


@router.get("/tasks/{task_id}/outputs/{index}")
async def task_output(
    task_id: str, index: Annotated[int, Path(ge=0, le=1000)], me: Looker, svc: Svc
) -> Response:
    """A stored output, through the function the API's output route uses."""
    return await extras.output(svc, task_id=task_id, index=index, client=me.scope)


@router.get("/tasks/{task_id}/input")
async def task_input(task_id: str, me: Looker, svc: Svc) -> Response:
    """The input photo, only where it is an upload stored here: the console never makes
    the operator's browser fetch a URL the caller chose."""
    return await extras.input_image(svc, task_id=task_id, client=me.scope)


ACTIONS: dict[str, tuple[str, str, str]] = {  # name: (title, explanation, button)
    "cancel": (
        "Cancel this task?",
        "The gateway asks Wiro to stop it. It becomes cancelled once Wiro confirms; "
        "it may still finish if it was about to.",
        "Yes, cancel the task",
    ),
    "redeliver": (
        "Send the notification again?",
        "The task's notification is sent to its webhook URL once more, "
        "with the same signature scheme.",
        "Yes, redeliver",
    ),
    "erase": (
        "Erase this task's images?",
        "The stored input photo and headshots are deleted here and at Wiro. The task "
        "record stays. This cannot be undone.",
        "Yes, erase the images",
    ),
}


@router.post("/tasks/{task_id}/{action}")
async def task_action(
    task_id: str, action: str, me: Actor, svc: Svc, confirmed: Annotated[str, Form()] = ""
) -> Response:
    if action not in ACTIONS:
        raise NotFound(f"No action {action!r}.")
    ctx = svc.ctx
    task = await tasks.get_task(ctx, task_id=task_id, client=me.scope)  # 404 before asking
    if confirmed != "1":  # no script to ask: ask with a page
        title, text, button = ACTIONS[action]
        return render(
            "confirm.html",
            {
                "viewer": me,
                "section": "tasks",
                "t": task,
                "action": action,
                "title": title,
                "text": text,
                "button": button,
            },
        )
    try:
        if action == "cancel":
            await tasks.cancel_task(ctx, task_id=task_id, client=me.scope)
        else:
            await extras.act(action, svc, task_id=task_id, client=me.scope)
    except GatewayError as e:
        if e.status == 404:
            raise
        return await _task_page(
            svc, me, task_id, status_code=e.status, notice={"kind": "error", "text": e.detail}
        )
    return RedirectResponse(f"/console/tasks/{task_id}?done={action}", 303)


# ---------------------------------------------------------------- statistics


@router.get("/stats")
async def stats_page(
    me: Looker,
    ctx: Context,
    window: Annotated[str, Query(max_length=10)] = "7d",
    client: Annotated[str, Query(max_length=100)] = "",
) -> Response:
    data = None
    error = None
    try:
        scope = me.scope
        if client.strip():
            if not me.admin:
                raise InvalidRequest("Only admin keys may choose a client.")
            scope = client.strip()
        data = await extras.stats(ctx, scope=scope, window=window)
    except InvalidRequest as e:
        error = e.detail
    return render(
        "stats.html",
        {
            "viewer": me,
            "section": "stats",
            "stats": data,
            "error": error,
            "window": window,
            "windows": extras.WINDOWS,
            "client": client,
        },
        status_code=422 if error else 200,
    )


# ---------------------------------------------------------------- assets and the rest


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound("No such file.")
    body, media_type = STATIC[name]
    return secure(Response(body, media_type=media_type), cache=True)


@router.get("/{rest:path}")
async def unknown(request: Request, rest: str) -> Response:
    raise NotFound(f"No console page {rest!r}.")
