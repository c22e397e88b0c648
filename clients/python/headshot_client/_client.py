"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the same methods, the same rules.

Both build their calls with ``_base`` and differ only in how they send them and sleep.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from headshot_client import _base as b
from headshot_client._errors import (
    StreamError,
    TransportError,
    WebhookVerificationError,
    error_from_response,
)
from headshot_client._models import Delivery, Event, Page, Task, WebhookEvent

Timestamp = datetime | str


def verify_webhook(payload: bytes | str, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """Check a notification's Standard Webhooks signature and return the event in it.

    ``payload`` is the request body exactly as received (bytes or text, not re-encoded
    JSON), ``headers`` its headers (``webhook-id``, ``webhook-timestamp``,
    ``webhook-signature``), ``secret`` the gateway's ``whsec_...`` secret. A bad or
    missing signature, or a timestamp more than 5 minutes off, raises
    ``WebhookVerificationError``; an unusable secret raises ``ValueError``.
    """
    try:
        webhook = Webhook(secret)
    except Exception as exc:  # the library's own errors for an empty or non-base64 secret
        raise ValueError(f"not a webhook secret: {exc}") from None
    try:
        body = webhook.verify(payload, {k: v for k, v in headers.items()})
    except Exception as exc:  # WebhookVerificationError, or ValueError on mangled headers
        raise WebhookVerificationError(str(exc) or type(exc).__name__) from exc
    return WebhookEvent.from_dict(body)


def _since(last_id: str | None, events: Iterable[Event]) -> builtins.list[Event]:
    if last_id is None or not last_id.isdigit():
        return builtins.list(events)
    return [e for e in events if e.id > int(last_id)]


class _Common:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        max_retry_after: float,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        self.base_url = base_url.rstrip("/")
        self.timeout = b.make_timeout(timeout)
        self.retry = b.RetryPolicy(max_retries=max_retries, max_retry_after=max_retry_after)
        self._headers = b.default_headers(api_key)

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: b.Call) -> httpx.Request:
        return http.build_request(
            call.method,
            self.base_url + call.path,
            params=tuple(call.params),
            json=call.json,
            files=call.files,
            headers={**self._headers, **call.headers},
            timeout=call.timeout or self.timeout,
        )

    verify_webhook = staticmethod(verify_webhook)


class Client(_Common):
    """The gateway's API, blocking. Use as a context manager or call ``close()``.

    ``timeout``: seconds (or an ``httpx.Timeout``) for each request; ``max_retries``:
    extra attempts on 429/503/connection errors where a repeat is safe;
    ``max_retry_after``: the longest ``Retry-After`` waited out. ``http_client``: your
    own ``httpx.Client`` (proxies, TLS, a test transport); it is not closed here.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout | None = b.DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_after: float = 60.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_after=max_retry_after,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.timeout)
        self._sleep: Callable[[float], None] = time.sleep

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: b.Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.send(self._request(self._http, call), stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(attempt, exc, idempotent=call.idempotent)
                if delay is None:
                    raise TransportError(str(exc) or type(exc).__name__) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(
                    attempt, response, idempotent=call.idempotent, also=call.retry_also
                )
                if delay is None:
                    response.read()
                    response.close()
                    raise error_from_response(response)
                response.close()
            self._sleep(delay)
            attempt += 1

    # ------------------------------------------------------------ tasks

    def submit(
        self,
        *,
        input: Mapping[str, Any],
        webhook_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
    ) -> Task:
        """Create a task (``POST /v1/tasks``). Without ``idempotency_key`` one is made, so
        the client's own retries never create a second task; ``task.replayed`` says the
        gateway answered an earlier request's task."""
        return b.task(
            self._send(
                b.submit_call(
                    input=input,
                    webhook_url=webhook_url,
                    metadata=metadata,
                    idempotency_key=idempotency_key,
                    model=model,
                )
            )
        )

    def get(self, task_id: str) -> Task:
        return b.task(self._send(b.get_call(task_id)))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """The task once terminal, or as it is when ``timeout`` seconds have passed (check
        ``task.done``); ``None`` waits as long as it takes. Held on the gateway with
        ``Prefer: wait`` in chunks of at most 60 s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.5
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            chunk = b.wait_chunk(remaining)
            response = self._send(b.wait_call(task_id, chunk, self.timeout))
            task, now = b.task(response), time.monotonic()
            if task.done or (deadline is not None and now >= deadline):
                return task
            if not b.wait_honoured(response):
                # Answered at once: poll instead, gently.
                self._sleep(pause if deadline is None else min(pause, deadline - now))
                pause = min(pause * 2, 5.0)

    def list_page(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        created_after: Timestamp | None = None,
        created_before: Timestamp | None = None,
        metadata: Mapping[str, str] | None = None,
        client: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Task]:
        """One page of the history, newest first (see ``list``)."""
        return b.task_page(
            self._send(
                b.list_call(
                    status=status,
                    model=model,
                    created_after=created_after,
                    created_before=created_before,
                    metadata=metadata,
                    client=client,
                    limit=limit,
                    cursor=cursor,
                )
            )
        )

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        created_after: Timestamp | None = None,
        created_before: Timestamp | None = None,
        metadata: Mapping[str, str] | None = None,
        client: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Task]:
        """Every task that matches, newest first, fetching page after page (``limit`` per
        page, 1-200). ``status`` one or several; ``metadata`` exact matches;
        ``client`` for admin keys."""
        cursor: str | None = None
        while True:
            page = self.list_page(
                status=status,
                model=model,
                created_after=created_after,
                created_before=created_before,
                metadata=metadata,
                client=client,
                limit=limit,
                cursor=cursor,
            )
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def events(self, task_id: str) -> builtins.list[Event]:
        """The task's whole timeline, oldest first (every page)."""
        out: builtins.list[Event] = []
        cursor: str | None = None
        while True:
            page = b.event_page(self._send(b.events_call(task_id, cursor)))
            out += page.data
            if not page.next_cursor:
                return out
            cursor = page.next_cursor

    def stream(self, task_id: str) -> Iterator[Event]:
        """The task's events live (Server-Sent Events), oldest first, from its first one.

        A dropped connection is resumed with ``Last-Event-ID``; the iterator ends when the
        gateway closes the stream after the terminal event. ``StreamError`` after
        ``max_retries`` failed reconnections in a row.
        """
        last_id: str | None = None
        terminal_seen = False
        failures = 0
        retry_ms: int | None = None  # the stream's own ``retry:`` advice
        while True:
            try:
                response = self._send(b.stream_call(task_id, last_id, self.timeout), stream=True)
                try:
                    if (wrong := b.not_a_stream(response)) is not None:
                        raise wrong
                    decoder = b.SSEDecoder()
                    decoder.retry_ms = retry_ms
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        retry_ms = decoder.retry_ms
                        if sse is None:
                            continue
                        last_id = decoder.last_id or last_id
                        event = b.stream_event(sse)
                        if event is not None:
                            failures = 0
                            terminal_seen = terminal_seen or event.terminal
                            yield event
                finally:
                    response.close()
            except (httpx.TransportError, TransportError) as exc:
                if terminal_seen:
                    return
                failures += 1
                if failures > self.retry.max_retries:
                    raise StreamError(f"event stream of {task_id} lost: {exc}") from exc
                self._sleep(b.reconnect_delay(self.retry, failures, retry_ms))
                continue
            if terminal_seen:
                return
            # Closed without a terminal event: finished meanwhile, or a replica went away.
            if self.get(task_id).done:
                yield from _since(last_id, self.events(task_id))
                return
            failures += 1
            if failures > self.retry.max_retries:
                raise StreamError(f"event stream of {task_id} keeps closing early")
            self._sleep(b.reconnect_delay(self.retry, failures, retry_ms))

    def cancel(self, task_id: str) -> Task:
        """Ask to cancel; the task becomes ``cancelled`` once the upstream confirms (it may
        still succeed). A terminal task raises ``Conflict``."""
        return b.task(self._send(b.cancel_call(task_id)))

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Upload a JPEG or PNG; returns the URL to pass as ``input["inputImageUrl"]``."""
        return str(self._send(b.upload_call(path)).json()["url"])

    def deliveries(self, task_id: str) -> builtins.list[Delivery]:
        """Every notification of the task and each of its attempts."""
        return b.deliveries(self._send(b.deliveries_call(task_id)))

    def redeliver(self, task_id: str) -> Delivery:
        """Send the task's terminal notification again, as a new delivery."""
        return Delivery.from_dict(self._send(b.redeliver_call(task_id)).json())


class AsyncClient(_Common):
    """The gateway's API for asyncio: the same methods as ``Client``, awaited (``list`` and
    ``stream`` are async iterators). Use ``async with`` or ``await aclose()``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout | None = b.DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_after: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_after=max_retry_after,
        )
        self._owns_http = http_client is None
        self._http = (
            http_client if http_client is not None else httpx.AsyncClient(timeout=self.timeout)
        )
        self._sleep: Callable[[float], Any] = asyncio.sleep

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: b.Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(self._request(self._http, call), stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(attempt, exc, idempotent=call.idempotent)
                if delay is None:
                    raise TransportError(str(exc) or type(exc).__name__) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(
                    attempt, response, idempotent=call.idempotent, also=call.retry_also
                )
                if delay is None:
                    await response.aread()
                    await response.aclose()
                    raise error_from_response(response)
                await response.aclose()
            await self._sleep(delay)
            attempt += 1

    async def submit(
        self,
        *,
        input: Mapping[str, Any],
        webhook_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
    ) -> Task:
        """See ``Client.submit``."""
        return b.task(
            await self._send(
                b.submit_call(
                    input=input,
                    webhook_url=webhook_url,
                    metadata=metadata,
                    idempotency_key=idempotency_key,
                    model=model,
                )
            )
        )

    async def get(self, task_id: str) -> Task:
        return b.task(await self._send(b.get_call(task_id)))

    # ``timeout`` is part of the call, not a cancellation scope: the last answer is
    # returned when it runs out, which ``asyncio.timeout`` could not do.
    async def wait(self, task_id: str, timeout: float | None = None) -> Task:  # noqa: ASYNC109
        """See ``Client.wait``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.5
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            chunk = b.wait_chunk(remaining)
            response = await self._send(b.wait_call(task_id, chunk, self.timeout))
            task, now = b.task(response), time.monotonic()
            if task.done or (deadline is not None and now >= deadline):
                return task
            if not b.wait_honoured(response):
                await self._sleep(pause if deadline is None else min(pause, deadline - now))
                pause = min(pause * 2, 5.0)

    async def list_page(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        created_after: Timestamp | None = None,
        created_before: Timestamp | None = None,
        metadata: Mapping[str, str] | None = None,
        client: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Task]:
        return b.task_page(
            await self._send(
                b.list_call(
                    status=status,
                    model=model,
                    created_after=created_after,
                    created_before=created_before,
                    metadata=metadata,
                    client=client,
                    limit=limit,
                    cursor=cursor,
                )
            )
        )

    async def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        created_after: Timestamp | None = None,
        created_before: Timestamp | None = None,
        metadata: Mapping[str, str] | None = None,
        client: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Task]:
        """See ``Client.list``."""
        cursor: str | None = None
        while True:
            page = await self.list_page(
                status=status,
                model=model,
                created_after=created_after,
                created_before=created_before,
                metadata=metadata,
                client=client,
                limit=limit,
                cursor=cursor,
            )
            for task in page.data:
                yield task
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def events(self, task_id: str) -> builtins.list[Event]:
        out: builtins.list[Event] = []
        cursor: str | None = None
        while True:
            page = b.event_page(await self._send(b.events_call(task_id, cursor)))
            out += page.data
            if not page.next_cursor:
                return out
            cursor = page.next_cursor

    async def stream(self, task_id: str) -> AsyncIterator[Event]:
        """See ``Client.stream``."""
        last_id: str | None = None
        terminal_seen = False
        failures = 0
        retry_ms: int | None = None  # the stream's own ``retry:`` advice
        while True:
            try:
                response = await self._send(
                    b.stream_call(task_id, last_id, self.timeout), stream=True
                )
                try:
                    if (wrong := b.not_a_stream(response)) is not None:
                        raise wrong
                    decoder = b.SSEDecoder()
                    decoder.retry_ms = retry_ms
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        retry_ms = decoder.retry_ms
                        if sse is None:
                            continue
                        last_id = decoder.last_id or last_id
                        event = b.stream_event(sse)
                        if event is not None:
                            failures = 0
                            terminal_seen = terminal_seen or event.terminal
                            yield event
                finally:
                    await response.aclose()
            except (httpx.TransportError, TransportError) as exc:
                if terminal_seen:
                    return
                failures += 1
                if failures > self.retry.max_retries:
                    raise StreamError(f"event stream of {task_id} lost: {exc}") from exc
                await self._sleep(b.reconnect_delay(self.retry, failures, retry_ms))
                continue
            if terminal_seen:
                return
            if (await self.get(task_id)).done:
                for event in _since(last_id, await self.events(task_id)):
                    yield event
                return
            failures += 1
            if failures > self.retry.max_retries:
                raise StreamError(f"event stream of {task_id} keeps closing early")
            await self._sleep(b.reconnect_delay(self.retry, failures, retry_ms))

    async def cancel(self, task_id: str) -> Task:
        return b.task(await self._send(b.cancel_call(task_id)))

    async def upload(self, path: str | os.PathLike[str]) -> str:
        call = await asyncio.to_thread(b.upload_call, path)  # reads the file
        return str((await self._send(call)).json()["url"])

    async def deliveries(self, task_id: str) -> builtins.list[Delivery]:
        return b.deliveries(await self._send(b.deliveries_call(task_id)))

    async def redeliver(self, task_id: str) -> Delivery:
        return Delivery.from_dict((await self._send(b.redeliver_call(task_id))).json())
