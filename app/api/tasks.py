"""The task routes: thin — parse, call ``app.tasks``, present."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BeforeValidator

from app import live, logs, tasks
from app.api.deps import ctx_of, hub_of, principal
from app.api.streaming import EventStream, applied, caller_gone
from app.clients import Principal
from app.context import Ctx
from app.errors import InvalidRequest, TooManyRequests
from app.lifecycle import Status
from app.models import Task
from app.schemas import (
    MAX_METADATA_KEYS,
    EventList,
    Problem,
    TaskCreate,
    TaskOut,
    TaskPage,
    event_out,
    task_out,
)
from app.wakeup import Hub, TooManyWaiters

PROBLEMS = {
    401: {"model": Problem, "description": "Missing or unknown API key"},
    404: {"model": Problem, "description": "Unknown task (or another client's)"},
    422: {"model": Problem, "description": "Invalid request"},
    429: {
        "model": Problem,
        "description": "Over the client's request rate limit (header Retry-After: seconds)",
    },
}

router = APIRouter(prefix="/v1", tags=["tasks"], responses={401: PROBLEMS[401], 429: PROBLEMS[429]})
# The caller is the routes' one dependency; the context and the waiters are the app's,
# read from the request (``deps.ctx_of``, ``hub_of``): a dependency costs every request
# its solving.
Caller = Annotated[Principal, Depends(principal)]
PreferHeader = Annotated[
    str | None,
    Header(
        alias="Prefer",
        description="`wait=N` (seconds, at most 60; more is read as 60): answer once the task "
        "is terminal or after N seconds, whichever is first (the status tells "
        "which). Honoured: `Preference-Applied: wait=N`. Not honoured (malformed, "
        "or the client already holds GATEWAY_MAX_WAITERS_PER_CLIENT waits): the "
        "answer is immediate, without that header.",
    ),
]
WAIT_HEADERS = {
    "Preference-Applied": {
        "description": "`wait=N` when the `Prefer: wait` was honoured",
        "schema": {"type": "string"},
    }
}


async def _wait(
    request: Request,
    response: Response,
    ctx: Ctx,
    hub: Hub,
    caller: Principal,
    task: Task,
    seconds: int | None,
) -> Task:
    """``task`` as it is after the ``Prefer: wait`` (if any)."""
    if seconds is None:
        return task
    honoured = True
    if not Status(task.status).terminal:
        async with caller_gone(request) as gone:
            task, honoured = await live.wait_for_task(
                ctx,
                hub,
                task_id=task.id,
                scope=caller.scope,
                client=caller.client,
                seconds=seconds,
                gone=gone,
            )
    applied(response, seconds if honoured else None)
    return task


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskOut,
    operation_id="createTask",
    summary="Submit a headshot task",
    responses={
        200: {
            "model": TaskOut,
            "description": "Idempotent replay of an earlier "
            "request with the same Idempotency-Key (header Idempotent-Replayed: true)",
            "headers": WAIT_HEADERS,
        },
        202: {
            "description": "Accepted (with `Prefer: wait`: as it is once terminal "
            "or after the wait)",
            "headers": WAIT_HEADERS,
        },
        409: {"model": Problem, "description": "The same Idempotency-Key is in flight"},
        413: {"model": Problem, "description": "Body too large"},
        422: {
            "model": Problem,
            "description": "Invalid request (also: a webhook_url "
            "whose host is a literal loopback, private, link-local, metadata or "
            "reserved address, unless GATEWAY_ALLOW_PRIVATE_NETWORKS)",
        },
    },
)
async def create_task(
    body: TaskCreate,
    request: Request,
    response: Response,
    caller: Caller,
    prefer: PreferHeader = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            pattern=r"\S",
            description="Up to 255 characters, not blank, scoped to the client: a repeat with "
            "the same body returns the original task (200, Idempotent-Replayed: true)",
        ),
    ] = None,
) -> TaskOut:
    """Validate against the model's parameter sheet, record, and forward to Wiro."""
    return await submit_task(request, response, caller, body, idempotency_key)


async def submit_task(
    request: Request,
    response: Response,
    caller: Principal,
    body: TaskCreate,
    idempotency_key: str | None,
) -> TaskOut:
    """``create_task``'s work once FastAPI has parsed the request, shared with its
    plain-ASGI twin (``app.api.submit_direct``): the status (200 on a replay) and
    headers go on ``response``, as FastAPI's ``Response`` parameter has them."""
    ctx = ctx_of(request)
    if (bad := body.webhook_refusal(allow_private=ctx.settings.allow_private_networks)) is not None:
        raise InvalidRequest(
            "webhook_url points at an address the gateway never delivers to.", errors=[bad]
        )
    if idempotency_key is not None and not idempotency_key.strip():
        raise InvalidRequest(
            "Idempotency-Key must not be empty.",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "empty"}],
        )
    # Record and send now, shielded: if the caller goes away mid-Run the attempt still
    # finishes and is recorded; if this process dies, the lease lapses and a worker
    # takes over (and will not re-send blindly). Tracked, so a graceful shutdown waits
    # for it (bounded) before giving the lease back.
    job = asyncio.create_task(
        tasks.submit(
            ctx,
            client=caller.client,
            body=body,
            idempotency_key=idempotency_key,
            client_cap=caller.limits.max_in_flight,
        )
    )
    ctx.track(job)
    with ctx.submitting():  # the background loops hold back while many are (``Ctx.room``)
        task, replayed = await asyncio.shield(job)
    logs.bind(task_id=task.id)
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/tasks/{task.id}"
    task = await _wait(
        request,
        response,
        ctx,
        hub_of(request),
        caller,
        task,
        live.prefer_wait(request.headers.getlist("prefer")),
    )
    return task_out(task)


@router.get(
    "/tasks/{task_id}",
    response_model=TaskOut,
    operation_id="getTask",
    summary="Read a task",
    responses={200: {"headers": WAIT_HEADERS}, 404: PROBLEMS[404]},
)
async def get_task(
    task_id: str,
    request: Request,
    response: Response,
    caller: Caller,
    prefer: PreferHeader = None,
) -> TaskOut:
    ctx = ctx_of(request)
    task = await tasks.get_task(ctx, task_id=task_id, client=caller.scope)
    return task_out(
        await _wait(
            request,
            response,
            ctx,
            hub_of(request),
            caller,
            task,
            live.prefer_wait(request.headers.getlist("prefer")),
        )
    )


_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?"
    r"([Zz]|[+-]\d{2}:?\d{2})?"
)


def _rfc3339(value: object) -> object:
    """Only RFC 3339 text: pydantic would also read ``1732500000`` as a Unix time."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp, e.g. 2026-11-25T10:00:00Z")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_rfc3339)]


def _in_utc_range(ts: datetime) -> bool:
    """Whether ``ts`` is still a datetime in UTC (0001-01-01T00:00+01:00 is not)."""
    try:
        ts.astimezone(UTC)
    except OverflowError:
        return False
    return True


@router.get(
    "/tasks",
    response_model=TaskPage,
    operation_id="listTasks",
    summary="List and filter the task history, newest first",
    responses={422: PROBLEMS[422]},
)
async def list_tasks(
    request: Request,
    caller: Caller,
    status: Annotated[list[Status] | None, Query()] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    created_after: Timestamp | None = None,
    created_before: Timestamp | None = None,
    client: Annotated[
        str | None, Query(max_length=100, description="admin keys only: one client's tasks")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TaskPage:
    """Filters: ``status`` (repeatable), ``model``, ``created_after``/``created_before``
    (RFC 3339), ``metadata.<key>=<value>`` (any number); ``cursor`` from ``next_cursor``."""
    metadata: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata."):
            name = key.removeprefix("metadata.")
            if not name or len(name) > 40 or len(value) > 500:
                raise InvalidRequest(
                    "Bad metadata filter.",
                    errors=[{"loc": ["query", key], "msg": "invalid filter"}],
                )
            metadata[name] = value
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"At most {MAX_METADATA_KEYS} metadata filters.",
            errors=[{"loc": ["query", "metadata"], "msg": "too many filters"}],
        )
    for name, ts in (("created_after", created_after), ("created_before", created_before)):
        if ts is not None and ts.tzinfo is None:
            raise InvalidRequest(
                "Timestamps need a time zone (RFC 3339).",
                errors=[{"loc": ["query", name], "msg": "missing offset"}],
            )
        if ts is not None and not _in_utc_range(ts):
            raise InvalidRequest(
                "Timestamp out of range.", errors=[{"loc": ["query", name], "msg": "out of range"}]
            )
    scope = caller.scope
    if client is not None:
        if not caller.admin:
            raise InvalidRequest(
                "Only admin keys may filter by client.",
                errors=[{"loc": ["query", "client"], "msg": "admin only"}],
            )
        scope = client
    rows, next_cursor = await tasks.list_tasks(
        ctx_of(request),
        client=scope,
        statuses=status or (),
        model=model,
        created_after=created_after,
        created_before=created_before,
        metadata=metadata,
        limit=limit,
        cursor=cursor,
    )
    return TaskPage(data=[task_out(t) for t in rows], next_cursor=next_cursor)


@router.get(
    "/tasks/{task_id}/events",
    response_model=EventList,
    operation_id="listTaskEvents",
    summary="The task's event timeline, oldest first (JSON pages, or a live stream)",
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: 42\ndata: {"id": 42, "status": "running", ...}\n\n',
                }
            },
            "description": "JSON: one page. `Accept: text/event-stream`: each event "
            "as it commits (`id:` the event id, `data:` the event), "
            "comment lines as heartbeats; it ends once the task is "
            "terminal and the events committed by then are sent.",
        },
        404: PROBLEMS[404],
        422: PROBLEMS[422],
        429: {
            "model": Problem,
            "description": "Over the client's request rate, or (streams) its cap of open waits",
        },
    },
)
async def list_events(
    task_id: str,
    request: Request,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=200,
            description=("from `next_cursor`; for a stream, where to start (after that page)"),
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=40,
            description="streams: resume after this event id (sent by EventSource on reconnect)",
        ),
    ] = None,
) -> EventList | Response:
    ctx, hub = ctx_of(request), hub_of(request)
    after = live.decode_event_cursor(cursor) if cursor else 0
    if "text/event-stream" in request.headers.get("accept", ""):
        if last_event_id is not None:
            after = live.parse_last_event_id(last_event_id)
        try:
            watch = await live.open_stream(
                ctx, hub, task_id=task_id, scope=caller.scope, client=caller.client
            )
        except TooManyWaiters:
            raise TooManyRequests(
                "This client already holds its limit of open waits and streams "
                "(GATEWAY_MAX_WAITERS_PER_CLIENT); close one or retry later.",
                headers={"Retry-After": "5"},
            ) from None
        s = ctx.settings
        return EventStream(
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
    events, next_cursor = await live.events_page(
        ctx, task_id=task_id, client=caller.scope, after=after, limit=limit
    )
    return EventList(data=[event_out(e) for e in events], next_cursor=next_cursor)


@router.post(
    "/tasks/{task_id}/cancel",
    status_code=202,
    response_model=TaskOut,
    operation_id="cancelTask",
    summary="Cancel a task",
    responses={
        404: PROBLEMS[404],
        409: {"model": Problem, "description": "The task is already terminal"},
    },
)
async def cancel_task(task_id: str, request: Request, caller: Caller) -> TaskOut:
    """Pending: cancelled at once. Otherwise Wiro is asked (Cancel when queued, Kill when
    running); the task becomes ``cancelled`` only once Wiro confirms."""
    return task_out(await tasks.cancel_task(ctx_of(request), task_id=task_id, client=caller.scope))
