"""The one client for Wiro's task API.

Every method makes exactly one attempt: retry policy belongs to the callers, which know
whether a retry is safe. For Run it never is blindly: Run is not idempotent and takes no
idempotency key, so a request that timed out after it was sent may already have started a
billable task, and resubmitting it can start a second one. That is why Run's failures are
split three ways: ``WiroUnavailable`` when the request provably did not start anything
(the connection was never made, or Wiro said "not now"), ``WiroRejected`` when Wiro
refused it, and ``WiroAmbiguous`` when nobody can tell, which callers must reconcile
rather than retry.

Wiro's HTTP status is unreliable (it may answer 200 with an error body, or 4xx/5xx with
one), so the body is parsed on every status, and success needs HTTP 2xx AND
``result: true`` (AND, for Run, a task id).
"""

from __future__ import annotations

import email.utils
import json as jsonlib
import math
import re
import time
from datetime import UTC
from typing import Any, NoReturn
from urllib.parse import quote
from urllib.request import getproxies

import httpcore
import httpx
from pydantic import SecretStr

from app import metrics, tracing
from app.http_pool import KEEPALIVE_EXPIRY_S, PoolTransport, send_direct
from app.wiro.errors import (
    WiroAccessDenied,
    WiroAmbiguous,
    WiroAuthError,
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
)
from app.wiro.models import RunAccepted, UpstreamTask
from app.wiro.signing import NonceSource, sign

__all__ = [
    "DEFAULT_TIMEOUT",
    "LIMITS",
    "WiroClient",
    "WiroHTTP",
    "error_for_code",
    "parse_retry_after",
]

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
_URLS_KEPT = 64
# A reconnect to Wiro costs a TLS handshake; more idle connections cost a readability
# check each on every request (httpcore's pool), which is why there are not more. Idle
# ones are retired before a server's 5 s keep-alive closes them (``KEEPALIVE_EXPIRY_S``).
LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S
)

# Transport errors raised before any byte of the request left: Run can safely be retried.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

# A Run answered by one of these without a Wiro error body was refused by the server or a
# proxy in front of it. Any other 5xx (504, Cloudflare's 524, ...) can mean "the origin is
# still working on it", so it is ambiguous.
_RUN_NOT_STARTED_5XX = frozenset({500, 502, 503})
# A gateway gave up waiting for Wiro: whatever the body, the Run may be in progress behind it.
_GATEWAY_TIMEOUTS = frozenset({504, 524})

# Code 0 is Wiro's catch-all; its documented messages (the error reference) are the only
# way to tell its kinds apart. What matches none of them is a server error (retryable).
_AUTH_MESSAGE = re.compile(
    r"authori[sz]|authenticat|api[ -]?key|signature|requested ip .* not allowed", re.IGNORECASE
)
_SUSPENDED_MESSAGE = re.compile(r"account has been suspended", re.IGNORECASE)
_NO_PERMISSION_MESSAGE = re.compile(
    r"permission for this action|tool-not-accessible", re.IGNORECASE
)
_NO_MODEL_MESSAGE = re.compile(r"slug-owner-project-not-exist", re.IGNORECASE)
_VALIDATION_MESSAGE = re.compile(
    r"\brequest (parameters?|files?)\b|must be (integer|float|between|one of)", re.IGNORECASE
)
_URL_MESSAGE = re.compile(r"error parsing url", re.IGNORECASE)
_NO_TASK_MESSAGE = re.compile(r"\bno task\b|task-not-exist", re.IGNORECASE)


def _secret(value: str | SecretStr | None) -> SecretStr | None:
    if value is None:
        return None
    secret = value if isinstance(value, SecretStr) else SecretStr(value)
    return secret if secret.get_secret_value() else None


def _truthy(value: Any) -> bool:
    """Wiro's ``result``: accepts ``true``, ``"true"`` and ``1``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1"}
    return False


def _falsy(value: Any) -> bool:
    """An explicit ``result: false`` (not merely a missing one)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value == 0
    if isinstance(value, str):
        return value.strip().lower() in {"false", "0"}
    return False


def _code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _json_object(content: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is anything else (as
    ``httpx.Response.json`` reads it: ``json.loads`` of the bytes)."""
    try:
        body = jsonlib.loads(content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _task_id(body: dict[str, Any] | None) -> str | None:
    if body is None:
        return None
    value = body.get("taskid")
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value).strip() or None


def _error_body(body: dict[str, Any] | None) -> tuple[int | None, str] | None:
    """``(code, message)`` of a Wiro error body, or None when the body is not one.

    An error body has an explicit false ``result`` or, lacking a true one, a non-empty
    ``errors`` list. Items may be objects or plain strings; the first one gives the code,
    and the message joins all of them.
    """
    if body is None or _truthy(body.get("result")):
        return None
    errors = body.get("errors")
    if isinstance(errors, (str, dict)):
        errors = [errors]
    if not isinstance(errors, list):
        errors = []
    if not errors and not _falsy(body.get("result")):
        return None
    code: int | None = None
    messages: list[str] = []
    for index, item in enumerate(errors):
        if isinstance(item, dict):
            if index == 0:
                code = _code(item.get("code"))
            message = item.get("message")
            text = str(message).strip() if message is not None else ""
        else:
            text = str(item).strip() if item is not None else ""
        if text:
            messages.append(text)
    return code, "; ".join(messages) or "Wiro answered result: false without a message"


def error_for_code(code: int | None, message: str, *, http_status: int | None) -> WiroError:
    """The exception for a Wiro error code (before any adjustment for the HTTP status),
    following the retry table of Wiro's error reference."""
    kwargs: dict[str, Any] = {"code": code, "http_status": http_status}
    if code == 96:
        return WiroConcurrencyLimit(message, **kwargs)
    if code == 97:
        return WiroInsufficientBalance(message, **kwargs)
    if code in (98, 99):  # sign-in / bearer token required: not for a project key
        return WiroAccessDenied(message, reason="access_denied", **kwargs)
    if code in (0, 1, None):
        if _NO_MODEL_MESSAGE.search(message):
            return WiroAccessDenied(message, reason="model_not_found", **kwargs)
        if _NO_PERMISSION_MESSAGE.search(message):
            return WiroAccessDenied(message, reason="access_denied", **kwargs)
    if code == 1:
        return WiroStateError(message, **kwargs)
    if code in (0, None):
        if _AUTH_MESSAGE.search(message):
            return WiroAuthError(message, **kwargs)
        if _SUSPENDED_MESSAGE.search(message):
            return WiroAccessDenied(message, reason="account_suspended", **kwargs)
        if _NO_TASK_MESSAGE.search(message):
            return WiroStateError(message, **kwargs)
        if _VALIDATION_MESSAGE.search(message):
            return WiroValidationError(message, **kwargs)
        if _URL_MESSAGE.search(message):
            return WiroConfigError(message, **kwargs)
        if code == 0:
            return WiroServerError(message, **kwargs)
    return WiroRejected(message, **kwargs)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class WiroHTTP(httpx.AsyncClient):
    """The shared ``httpx.AsyncClient`` for Wiro: no redirects followed, no auth, no event
    hooks, and its transport known (``direct``), so that ``WiroClient`` hands requests
    to it directly (``app.http_pool.send_direct``), or, for a ``PoolTransport``, its JSON
    calls to httpcore's pool (``WiroClient._exchange``).

    ``transport`` replaces the network (tests). Without one the transport is the one
    the client would build for itself, unless the environment names a proxy
    (``HTTPS_PROXY``...): then the client routes by URL as usual and ``direct`` is None.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if transport is None and not any(getproxies().get(s) for s in ("http", "https", "all")):
            transport = PoolTransport(limits=LIMITS, trust_env=True)
        super().__init__(transport=transport, follow_redirects=False, limits=LIMITS)
        self.direct = transport


class WiroClient:
    """Wiro's task API over one shared ``httpx.AsyncClient`` (in the app a ``WiroHTTP``);
    one attempt per call."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | SecretStr | None,
        api_secret: str | SecretStr | None,
        http: httpx.AsyncClient,
        nonce_source: NonceSource | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = _secret(api_key)
        self._api_secret = _secret(api_secret)
        self._http = http
        self._direct = http.direct if isinstance(http, WiroHTTP) else None
        # httpcore's pool itself where there is one: see ``_exchange``.
        self._pool = self._direct if isinstance(self._direct, PoolTransport) else None
        self._urls: dict[str, tuple[httpx.URL, httpcore.URL]] = {}  # parsed once per path
        self._nonces = nonce_source if nonce_source is not None else NonceSource()
        self._timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        self._extensions = {"timeout": self._timeout.as_dict()}  # as build_request sets it

    def __repr__(self) -> str:
        return f"WiroClient(base_url={self._base_url!r})"

    def auth_headers(self) -> dict[str, str]:
        """Signature headers, ``x-api-key`` alone without a secret, or none without a key."""
        if self._api_key is None:
            return {}
        key = self._api_key.get_secret_value()
        if self._api_secret is None:
            return {"x-api-key": key}
        nonce = str(self._nonces.next())
        return {
            "x-api-key": key,
            "x-nonce": nonce,
            "x-signature": sign(key, self._api_secret.get_secret_value(), nonce),
        }

    # -- endpoints ---------------------------------------------------------------------

    async def run(
        self, model: str, inputs: dict[str, str], *, callback_url: str | None
    ) -> RunAccepted:
        """Start a task. Never retried here; see the module docstring."""
        payload = {key: "" if value is None else str(value) for key, value in inputs.items()}
        if callback_url is not None:
            payload["callbackUrl"] = callback_url
        path = "/Run/" + "/".join(quote(part, safe="") for part in model.strip("/").split("/"))
        body = await self._post(path, json=payload, is_run=True)
        task_id = _task_id(body)
        assert task_id is not None  # _post checked it for Run
        token = body.get("socketaccesstoken")
        return RunAccepted(task_id=task_id, socket_token="" if token is None else str(token))

    async def detail(
        self, *, task_id: str | None = None, task_token: str | None = None
    ) -> UpstreamTask:
        """The task by id or by task token; "no task yet" raises ``WiroStateError``."""
        if (task_id is None) == (task_token is None):
            raise ValueError("give exactly one of task_id and task_token")
        payload = {"taskid": task_id} if task_id is not None else {"tasktoken": task_token}
        body = await self._post("/Task/Detail", json=payload)
        tasks = self._tasklist(body, "/Task/Detail")
        if not tasks:
            raise WiroStateError("There is no task yet.", code=1, http_status=None)
        return tasks[0]

    async def cancel(self, task_id: str) -> UpstreamTask | None:
        """Cancel a queued task; the task when Wiro returns it."""
        body = await self._post("/Task/Cancel", json={"taskid": task_id})
        tasks = self._tasklist(body, "/Task/Cancel")
        return tasks[0] if tasks else None

    async def kill(self, task_id: str) -> UpstreamTask | None:
        """Kill an assigned or running task; the task when Wiro returns it."""
        body = await self._post("/Task/Kill", json={"taskid": task_id})
        tasks = self._tasklist(body, "/Task/Kill")
        return tasks[0] if tasks else None

    async def input_output_delete(self, task_token: str) -> None:
        """Delete a finished task's input and output files at Wiro (idempotent)."""
        await self._post("/Task/InputOutputDelete", json={"tasktoken": task_token})

    async def list_tasks(self, *, limit: int = 50, start: int = 0) -> list[UpstreamTask]:
        """The project's tasks, newest first, ``limit`` of them from offset ``start``
        (undocumented endpoint)."""
        payload = {
            "type": "model",
            "sort": "id",
            "order": "DESC",
            "start": str(start),
            "limit": str(limit),
        }
        body = await self._post("/Task/List", json=payload)
        return self._tasklist(body, "/Task/List")

    async def upload(self, *, filename: str, content: bytes, content_type: str) -> str:
        """Upload a file to Wiro's storage; its public URL (to pass as an input URL)."""
        body = await self._post("/File/Upload", files={"file": (filename, content, content_type)})
        items = body.get("list")
        first = items[0] if isinstance(items, list) and items else None
        url = first.get("url") if isinstance(first, dict) else None
        if not isinstance(url, str) or not url.strip():
            raise WiroUnavailable("/File/Upload: success without a file URL", http_status=200)
        return url.strip()

    # -- plumbing ----------------------------------------------------------------------

    @staticmethod
    def _tasklist(body: dict[str, Any], path: str) -> list[UpstreamTask]:
        tasks = body.get("tasklist")
        if tasks is None:
            return []
        if not isinstance(tasks, list):
            raise WiroUnavailable(f"{path}: tasklist is not a list", http_status=None)
        return [UpstreamTask.from_wire(item) for item in tasks if isinstance(item, dict)]

    async def _post(
        self,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        is_run: bool = False,
    ) -> dict[str, Any]:
        """``_post_once``, timed and counted by endpoint and outcome (app/metrics.py)."""
        started = time.perf_counter()
        error: BaseException | None = None
        endpoint = metrics.upstream_endpoint(path)
        try:
            # A span per call when tracing is on (app/tracing.py): Wiro's task id, never
            # a task token, a key or a signature.
            with tracing.wiro_call(endpoint, _task_id(json)) as span:
                body = await self._post_once(path, json=json, files=files, is_run=is_run)
                if is_run:
                    tracing.set_wiro_task_id(span, _task_id(body))
                return body
        except BaseException as e:  # cancellation included: it is an outcome too
            error = e
            raise
        finally:
            metrics.upstream_call(endpoint, error, time.perf_counter() - started)

    def _url(self, path: str) -> tuple[httpx.URL, httpcore.URL]:
        """The URL of ``path``, and the same for httpcore (as ``PoolTransport`` makes it);
        both immutable, so kept for the next call."""
        urls = self._urls.get(path)
        if urls is None:
            url = httpx.URL(self._base_url + path)
            core = httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            )
            urls = (url, core)
            if len(self._urls) < _URLS_KEPT:  # a few endpoints and a Run path per model
                self._urls[path] = urls
        return urls

    async def _post_once(
        self,
        path: str,
        *,
        json: dict[str, Any] | None,
        files: dict[str, tuple[str, bytes, str]] | None,
        is_run: bool,
    ) -> dict[str, Any]:
        """One POST; the body of a success, or the classified ``WiroError``."""
        try:
            if self._pool is not None and json is not None:
                status, retry_after, content = await self._exchange(self._pool, path, json)
            else:
                request = self._http.build_request(
                    "POST",
                    self._url(path)[0],
                    json=json,
                    files=files,
                    headers=self.auth_headers(),
                    timeout=self._timeout,
                )
                if self._direct is None:
                    response = await self._http.send(request)
                else:
                    response = await send_direct(self._http, self._direct, request, stream=False)
                status, content = response.status_code, response.content
                retry_after = response.headers.get("retry-after")
        except httpx.RequestError as exc:
            # Only the exception's type and text: its .request carries our headers.
            detail = str(exc).strip()
            message = f"{path}: {type(exc).__name__}" + (f": {detail}" if detail else "")
            if is_run and not isinstance(exc, _NOT_SENT):
                raise WiroAmbiguous(message) from exc
            raise WiroUnavailable(message) from exc
        return self._interpret(status, content, retry_after, path, is_run=is_run)

    async def _exchange(
        self, pool: PoolTransport, path: str, payload: dict[str, Any]
    ) -> tuple[int, str | None, bytes]:
        """``build_request`` + ``send_direct`` without httpx's Request and Response, which
        cost about half of a call's CPU (issue 15): the same bytes on the wire, timeouts,
        errors (httpx's classes) and cookies, straight through httpcore's pool. The
        status, the ``Retry-After`` of a 429 and the body, decoded as httpx decodes it."""
        url, core_url = self._url(path)
        content = jsonlib.dumps(
            payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        # httpx's order: Host, the client's headers (Accept, Accept-Encoding, Connection,
        # User-Agent), the call's, Cookie, then the body's.
        headers = [(b"Host", url.netloc), *self._http.headers.raw]
        headers += [(k.encode("ascii"), v.encode("ascii")) for k, v in self.auth_headers().items()]
        if self._http.cookies:
            headers += _cookie_header(self._http.cookies, url)
        headers += [
            (b"Content-Length", str(len(content)).encode("ascii")),
            (b"Content-Type", b"application/json"),
        ]
        if self._http.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        request = httpcore.Request(
            b"POST", core_url, headers=headers, content=content, extensions=self._extensions
        )
        response = await pool.open(request)
        try:
            if any(k.lower() in (b"set-cookie", b"set-cookie2") for k, _ in response.headers):
                self._http.cookies.extract_cookies(
                    httpx.Response(
                        response.status,
                        headers=response.headers,
                        stream=httpx.ByteStream(b""),
                        request=httpx.Request("POST", url, headers=headers),
                    )
                )
            body = await pool.read(response)
        finally:
            await response.aclose()
        status = response.status
        if any(k.lower() == b"content-encoding" for k, _ in response.headers):
            # Rare (small JSON answers): httpx's own decoders, its DecodingError included.
            body = httpx.Response(status, headers=response.headers, content=body).content
        retry_after = httpx.Headers(response.headers).get("retry-after") if status == 429 else None
        return status, retry_after, body

    @staticmethod
    def _interpret(
        status: int, content: bytes, retry_after: str | None, path: str, *, is_run: bool
    ) -> dict[str, Any]:
        body = _json_object(content)
        error = _error_body(body)

        if 200 <= status < 300:
            if body is None:
                _unusable(
                    f"{path}: HTTP {status} with a body that is not a JSON object", status, is_run
                )
            if _truthy(body.get("result")):
                if is_run and _task_id(body) is None:
                    raise WiroAmbiguous(f"{path}: result true without a taskid", http_status=status)
                return body
            if error is None:
                _unusable(f"{path}: HTTP {status} without a result", status, is_run)
            raise error_for_code(*error, http_status=status)

        # Not 2xx. For Run, a visible task id means a task may exist, whatever the status
        # and the body say: never let that look retryable.
        hint = _task_id(body) if is_run else None
        if hint is not None:
            raise WiroAmbiguous(
                f"{path}: HTTP {status} with taskid {hint}", http_status=status, task_id=hint
            )

        if status == 429:
            code, message = error if error is not None else (None, f"{path}: rate limited")
            raise WiroRateLimited(
                message,
                code=code,
                http_status=status,
                retry_after=parse_retry_after(retry_after),
            )

        if status >= 500:
            if is_run and (
                status in _GATEWAY_TIMEOUTS
                or (error is None and status not in _RUN_NOT_STARTED_5XX)
            ):
                raise WiroAmbiguous(f"{path}: HTTP {status}", http_status=status)
            if error is None:
                raise WiroUnavailable(f"{path}: HTTP {status}", http_status=status)
            exc = error_for_code(*error, http_status=status)
            if type(exc) is WiroRejected:
                # Code 0 or an unknown code on a 5xx is server trouble, not a refusal.
                raise WiroUnavailable(exc.message, code=exc.code, http_status=status)
            raise exc

        if error is None:
            message = f"{path}: HTTP {status}"
            if status in (401, 403):
                raise WiroAuthError(message, http_status=status)
            raise WiroRejected(message, http_status=status)
        exc = error_for_code(*error, http_status=status)
        if status in (401, 403) and type(exc) in (
            WiroRejected,
            WiroValidationError,
            WiroServerError,
        ):
            # The 401 family is Wiro's answer to credentials, whatever the message says.
            raise WiroAuthError(exc.message, code=exc.code, http_status=status)
        raise exc


def _cookie_header(cookies: httpx.Cookies, url: httpx.URL) -> list[tuple[bytes, bytes]]:
    """The ``Cookie`` header ``build_request`` adds from the client's jar (Wiro's edge
    may set one: Cloudflare's ``__cf_bm``), made as it makes it: on a copy of the jar."""
    probe = httpx.Request("POST", url)
    httpx.Cookies(cookies).set_cookie_header(probe)
    return [(k, v) for k, v in probe.headers.raw if k.lower() == b"cookie"]


def _unusable(message: str, status: int, is_run: bool) -> NoReturn:
    """A 2xx without a usable answer: ambiguous for Run, "try later" for the rest."""
    if is_run:
        raise WiroAmbiguous(message, http_status=status)
    raise WiroUnavailable(message, http_status=status)
