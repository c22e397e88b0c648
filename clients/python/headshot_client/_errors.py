"""The client's exceptions.

```
HeadshotError                     anything this package raises on purpose
├── ApiError                      the gateway answered with an error (problem+json)
│   ├── BadRequest                400
│   ├── AuthError                 401 / 403: missing, unknown or revoked key
│   ├── NotFound                  404: unknown task (or another client's)
│   ├── Conflict                  409: terminal task, idempotent request in flight, ...
│   ├── Gone                      410: erased images
│   ├── PayloadTooLarge           413
│   ├── UnsupportedMediaType      415: an upload that is not a JPEG or PNG
│   ├── ValidationError           422: with ``errors`` = [{"loc": [...], "msg": ...}]
│   ├── RateLimited               429: with ``retry_after`` (seconds) when given
│   └── ServerError               5xx
│       └── ServiceUnavailable    503
├── TransportError                no answer: connection refused/reset, timeout
├── StreamError                   the event stream could not be kept up
└── WebhookVerificationError      a notification whose signature does not verify
```
Every ``ApiError`` carries the problem's ``status``, ``type``, ``title``, ``detail`` and
``errors`` as attributes; decide on ``status``/``type``, not on the text.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from typing import Any

import httpx


class HeadshotError(Exception):
    """Base of every exception this package raises on purpose."""


class ApiError(HeadshotError):
    """The gateway answered with an error status; the fields of its problem+json."""

    def __init__(
        self,
        *,
        status: int,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        errors: list[dict[str, Any]] | None = None,
        headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers if headers is not None else httpx.Headers()


class BadRequest(ApiError):
    pass


class AuthError(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Gone(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class UnsupportedMediaType(ApiError):
    pass


class ValidationError(ApiError):
    pass


class RateLimited(ApiError):
    """Over the client's rate limit. ``retry_after``: seconds the gateway asked to wait."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class ServerError(ApiError):
    pass


class ServiceUnavailable(ServerError):
    pass


class TransportError(HeadshotError):
    """No answer from the gateway (after the retries that were safe); see ``__cause__``."""


class StreamError(HeadshotError):
    """The event stream could not be opened or resumed."""


class WebhookVerificationError(HeadshotError):
    """A notification's headers or signature do not verify with the given secret."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """The ``ApiError`` for an error answer; its body must have been read."""
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    problem: Any = None
    try:
        problem = response.json()
    except ValueError:
        pass
    if not isinstance(problem, dict):
        # Not problem+json (a proxy's HTML page, say): keep a little of the text.
        return cls(
            status=status,
            title=response.reason_phrase,
            detail=response.text[:500].strip(),
            headers=response.headers,
        )
    errors = problem.get("errors")
    return cls(
        status=status,
        type=str(problem.get("type") or "about:blank"),
        title=str(problem.get("title") or response.reason_phrase),
        detail=str(problem.get("detail") or ""),
        errors=errors if isinstance(errors, list) else None,
        headers=response.headers,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent
    or unreadable."""
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
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
