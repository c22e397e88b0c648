"""What the sync and the asyncio client share: building requests, the retry rule, reading
answers, and the Server-Sent Events decoder. Nothing here does I/O."""

from __future__ import annotations

import json
import math
import mimetypes
import os
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from headshot_client._errors import (
    HeadshotError,
    StreamError,
    parse_retry_after,
)
from headshot_client._models import Delivery, Event, Page, Task

__version__ = "0.1.0"

DEFAULT_TIMEOUT_S = 30.0
MAX_WAIT_CHUNK_S = 60  # the gateway holds a ``Prefer: wait`` for at most 60 s
STREAM_READ_TIMEOUT_S = 75.0  # the stream sends heartbeats well within this


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before another attempt.

    - 429 is retried for every call: the gateway refused it before doing anything.
    - 409 on ``submit`` (its Idempotency-Key still in flight) is retried with backoff.
    - 503 and a connection lost mid-request are retried only for calls that are safe to
      repeat: reads, cancel, and ``submit`` (it always sends an Idempotency-Key, so a
      repeat returns the task the first attempt made).
    - A connection that could not be opened (nothing was sent) is retried for any call.
    - ``Retry-After`` is honoured; one longer than ``max_retry_after`` is not waited
      out: the error is raised at once (retrying earlier would only be refused again).
    - Otherwise exponential backoff with jitter: ``backoff * 2**attempt``, capped.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int) -> float:
        """The backoff before retry number ``attempt + 1`` (with jitter)."""
        base: float = min(self.max_backoff, self.backoff * 2**attempt)
        return base * (0.5 + random.random() / 2)

    def after_response(
        self,
        attempt: int,
        response: httpx.Response,
        *,
        idempotent: bool,
        also: frozenset[int] = frozenset(),
    ) -> float | None:
        """Seconds to wait before retrying this answer (``also``: statuses this call may
        retry besides 429/503); None: do not retry."""
        status = response.status_code
        if attempt >= self.max_retries or status not in (429, 503, *also):
            return None
        if status == 503 and not idempotent:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            return self.delay(attempt)
        if retry_after > self.max_retry_after:
            return None
        return retry_after

    def after_error(
        self, attempt: int, exc: httpx.TransportError, *, idempotent: bool
    ) -> float | None:
        """Seconds to wait before retrying after a transport error; None: do not retry."""
        if attempt >= self.max_retries:
            return None
        never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        if not (never_sent or idempotent):
            return None
        return self.delay(attempt)


@dataclass
class Call:
    """One API call, before it is sent (and re-sent, on a retry)."""

    method: str
    path: str
    idempotent: bool
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None
    timeout: httpx.Timeout | None = None
    retry_also: frozenset[int] = frozenset()


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(DEFAULT_TIMEOUT_S if timeout is None else timeout)


def default_headers(api_key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "User-Agent": f"headshot-gateway-client/{__version__}",
    }


# ---------------------------------------------------------------- the calls


def submit_call(
    *,
    input: Mapping[str, Any],
    webhook_url: str | None,
    metadata: Mapping[str, str] | None,
    idempotency_key: str | None,
    model: str | None,
) -> Call:
    body: dict[str, Any] = {"input": dict(input)}
    if model is not None:
        body["model"] = model
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    if metadata is not None:
        body["metadata"] = dict(metadata)
    # Made once per submit and sent on every attempt: a retry after a lost answer gets
    # the task the first attempt created instead of a second one.
    key = idempotency_key if idempotency_key is not None else f"hgc-{uuid.uuid4()}"
    # A 409 here means "the same key is still being processed" (a first attempt whose
    # answer was lost is still running): retried, it becomes that attempt's task.
    return Call(
        "POST",
        "/v1/tasks",
        idempotent=True,
        json=body,
        headers={"Idempotency-Key": key},
        retry_also=frozenset({409}),
    )


def task_path(task_id: str) -> str:
    if not task_id or "/" in task_id:
        raise ValueError(f"not a task id: {task_id!r}")
    return f"/v1/tasks/{task_id}"


def get_call(task_id: str) -> Call:
    return Call("GET", task_path(task_id), idempotent=True)


def wait_call(task_id: str, seconds: int, timeout: httpx.Timeout) -> Call:
    """GET the task, held up to ``seconds`` (0: a plain read)."""
    if seconds <= 0:
        return get_call(task_id)
    # The read timeout must outlast the hold.
    read = max(timeout.read or 0.0, seconds + 15.0)
    return Call(
        "GET",
        task_path(task_id),
        idempotent=True,
        headers={"Prefer": f"wait={seconds}"},
        timeout=httpx.Timeout(timeout.connect, read=read, write=timeout.write, pool=timeout.pool),
    )


def wait_chunk(remaining: float | None) -> int:
    """Seconds to ask for in the next ``Prefer: wait``: at most 60; 0 once the time is up
    (one last plain read)."""
    if remaining is None:
        return MAX_WAIT_CHUNK_S
    if remaining <= 0:
        return 0
    return max(1, min(MAX_WAIT_CHUNK_S, math.ceil(remaining)))


def wait_honoured(response: httpx.Response) -> bool:
    """Whether the gateway held the request (``Preference-Applied: wait=N``). When it did
    not (a gateway without ``Prefer: wait``, or this client's cap of open waits reached)
    the answer came at once, and the caller must pause before asking again."""
    return "preference-applied" in response.headers


def _timestamp(name: str, value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (the API takes RFC 3339)")
    return value.isoformat()


def list_call(
    *,
    status: str | Iterable[str] | None,
    model: str | None,
    created_after: datetime | str | None,
    created_before: datetime | str | None,
    metadata: Mapping[str, str] | None,
    client: str | None,
    limit: int | None,
    cursor: str | None,
) -> Call:
    params: list[tuple[str, str]] = []
    if status is not None:
        for s in [status] if isinstance(status, str) else status:
            params.append(("status", str(s)))
    if model is not None:
        params.append(("model", model))
    if created_after is not None:
        params.append(("created_after", _timestamp("created_after", created_after)))
    if created_before is not None:
        params.append(("created_before", _timestamp("created_before", created_before)))
    for key, value in (metadata or {}).items():
        params.append((f"metadata.{key}", value))
    if client is not None:
        params.append(("client", client))
    if limit is not None:
        params.append(("limit", str(limit)))
    if cursor is not None:
        params.append(("cursor", cursor))
    return Call("GET", "/v1/tasks", idempotent=True, params=params)


def task_page(response: httpx.Response) -> Page[Task]:
    body = response.json()
    return Page(data=[Task.from_dict(t) for t in body["data"]], next_cursor=body.get("next_cursor"))


def events_call(task_id: str, cursor: str | None) -> Call:
    params = [] if cursor is None else [("cursor", cursor)]
    return Call("GET", f"{task_path(task_id)}/events", idempotent=True, params=params)


def event_page(response: httpx.Response) -> Page[Event]:
    body = response.json()
    return Page(
        data=[Event.from_dict(e) for e in body["data"]], next_cursor=body.get("next_cursor")
    )


def cancel_call(task_id: str) -> Call:
    # Safe to repeat: a second cancel of a task being cancelled changes nothing.
    return Call("POST", f"{task_path(task_id)}/cancel", idempotent=True)


def deliveries_call(task_id: str) -> Call:
    return Call("GET", f"{task_path(task_id)}/deliveries", idempotent=True)


def deliveries(response: httpx.Response) -> list[Delivery]:
    return [Delivery.from_dict(d) for d in response.json()["data"]]


def redeliver_call(task_id: str) -> Call:
    # Not repeated on a lost answer: each request makes a new delivery.
    return Call("POST", f"{task_path(task_id)}/deliveries/redeliver", idempotent=False)


def upload_call(path: str | os.PathLike[str]) -> Call:
    p = Path(path)
    ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    # Not repeated on a lost answer (a second upload would be an orphan copy).
    return Call(
        "POST", "/v1/uploads", idempotent=False, files={"file": (p.name, p.read_bytes(), ctype)}
    )


def task(response: httpx.Response) -> Task:
    return Task.from_dict(
        response.json(), replayed=response.headers.get("idempotent-replayed") == "true"
    )


# ---------------------------------------------------------------- Server-Sent Events


@dataclass
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """The HTML Living Standard's event-stream parser, fed one line at a time."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """Returns the event a blank line completes, if any."""
        if not line:
            if self._id is not None:
                self.last_id = self._id
            if not self._data:
                self._event = ""
                return None
            sse = ServerSentEvent(
                data="\n".join(self._data), event=self._event or "message", id=self.last_id
            )
            self._data, self._event = [], ""
            return sse
        if line.startswith(":"):
            return None  # a comment: the gateway's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def stream_call(task_id: str, last_event_id: str | None, timeout: httpx.Timeout) -> Call:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return Call(
        "GET",
        f"{task_path(task_id)}/events",
        idempotent=True,
        headers=headers,
        timeout=httpx.Timeout(
            timeout.connect, read=STREAM_READ_TIMEOUT_S, write=timeout.write, pool=timeout.pool
        ),
    )


def reconnect_delay(policy: RetryPolicy, failures: int, retry_ms: int | None) -> float:
    """The pause before reconnecting a stream: the stream's ``retry:`` if it gave one
    (capped like a ``Retry-After``), else the usual backoff."""
    if retry_ms is not None:
        return min(retry_ms / 1000, policy.max_retry_after)
    return policy.delay(failures - 1)


def stream_event(sse: ServerSentEvent) -> Event | None:
    """The task event an SSE message carries; None for anything else (keep-alives)."""
    if sse.event not in ("message", "event", "task.event"):
        return None
    try:
        body = json.loads(sse.data)
    except ValueError:
        return None
    if not isinstance(body, dict) or "id" not in body or "source" not in body:
        return None
    return Event.from_dict(body)


def not_a_stream(response: httpx.Response) -> HeadshotError | None:
    ctype = response.headers.get("content-type", "")
    if ctype.split(";")[0].strip() == "text/event-stream":
        return None
    return StreamError(
        f"the gateway answered {ctype or 'no content type'} instead of an "
        "event stream (a gateway without the live stream?)"
    )
