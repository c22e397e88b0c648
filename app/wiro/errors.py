"""Failures of calls to Wiro, as a small tree that tells the caller what it may do next.

::

    WiroError(Exception)            message, code (Wiro's error code), http_status
    ├── WiroUnavailable             not reached, or "not now": safe to retry later
    │   ├── WiroRateLimited         HTTP 429; retry_after seconds when Wiro said
    │   └── WiroConcurrencyLimit    code 96: retry when one of our running tasks ends
    ├── WiroAmbiguous               Run only: the request may have reached Wiro and started
    │                               a task, but no usable answer came; task_id if one was seen
    │   └── WiroServerError         code 0 with none of the documented client-side messages:
    │                               Wiro's own trouble, retryable with backoff (a
    │                               ``result: false`` answer carries no taskid: nothing started)
    └── WiroRejected                Wiro answered ``result: false``: retrying the same
        │                           request will fail the same way
        ├── WiroInsufficientBalance code 97
        ├── WiroValidationError     code 0 "Request parameter ... required" and the like
        ├── WiroAccessDenied        account suspended, no permission, codes 98 and 99, code 1
        │                           "tool-not-accessible" / "slug-owner-project-not-exist"
        ├── WiroConfigError         our configuration: "Error parsing url." (HTTP 404)
        │   └── WiroAuthError       HTTP 401/403, or code 0 about authorization / allowed IPs
        └── WiroStateError          code 1: no such task (yet), or not in a state for that

``WiroAmbiguous`` exists because Run is not idempotent: after a read timeout a blind retry
can start a second billable task, so the caller must reconcile (look the task up, or give
up and report) instead of resubmitting.

Messages come from Wiro's response body or from the transport error; they never include
request headers, so neither the API key nor the signature can leak through ``str`` or
``repr``.
"""

from __future__ import annotations

__all__ = [
    "WiroAccessDenied",
    "WiroAmbiguous",
    "WiroAuthError",
    "WiroConcurrencyLimit",
    "WiroConfigError",
    "WiroError",
    "WiroInsufficientBalance",
    "WiroRateLimited",
    "WiroRejected",
    "WiroServerError",
    "WiroStateError",
    "WiroUnavailable",
    "WiroValidationError",
]


class WiroError(Exception):
    """Base of every failure of a call to Wiro."""

    def __init__(
        self, message: str, *, code: int | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status

    def _repr_fields(self) -> dict[str, object]:
        return {"message": self.message, "code": self.code, "http_status": self.http_status}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def __str__(self) -> str:
        return self.message


class WiroUnavailable(WiroError):
    """Wiro was not reached or said "not now"; the same request may be retried later."""


class WiroRateLimited(WiroUnavailable):
    """HTTP 429, the per-project rate limit."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        http_status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.retry_after = retry_after

    def _repr_fields(self) -> dict[str, object]:
        return {**super()._repr_fields(), "retry_after": self.retry_after}


class WiroConcurrencyLimit(WiroUnavailable):
    """Code 96: the balance-based limit on concurrent tasks is reached."""


class WiroServerError(WiroUnavailable):
    """Code 0 that is neither validation, authorization nor account: Wiro's error
    reference marks these retryable with exponential backoff."""


class WiroAmbiguous(WiroError):
    """Run only: the request may have started a task, but no usable answer came back.

    ``task_id`` is a hint, set when a task id was visible in a response that was not a
    clean success (for example an HTTP 5xx whose body still carried a ``taskid``).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        http_status: int | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.task_id = task_id

    def _repr_fields(self) -> dict[str, object]:
        return {**super()._repr_fields(), "task_id": self.task_id}


class WiroRejected(WiroError):
    """Wiro answered ``result: false``; ``code`` is None when it gave no usable code."""


class WiroInsufficientBalance(WiroRejected):
    """Code 97."""


class WiroValidationError(WiroRejected):
    """Code 0 about the request's parameters: the same request fails the same way."""


class WiroAccessDenied(WiroRejected):
    """The account or project may not do this: a stable ``reason`` for the task's error.

    ``reason`` is one of ``account_suspended``, ``access_denied``, ``model_not_found``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        http_status: int | None = None,
        reason: str = "access_denied",
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.reason = reason

    def _repr_fields(self) -> dict[str, object]:
        return {**super()._repr_fields(), "reason": self.reason}


class WiroConfigError(WiroRejected):
    """Our side is misconfigured (base URL, model path, credentials): nothing was started,
    and it is fixed by an operator, not by the caller; retried, and loudly reported."""


class WiroAuthError(WiroConfigError):
    """Bad or missing credentials: HTTP 401/403, or a code-0 authorization message."""


class WiroStateError(WiroRejected):
    """Code 1: the task does not exist (yet) or is not in a state that allows the call."""

    @property
    def no_task(self) -> bool:
        """True for "There is no task yet.": a fresh task may still appear, so tolerate a few."""
        return "no task" in self.message.lower()

    @property
    def gone(self) -> bool:
        """True when the task does not exist (anymore): "no task" or "task-not-exist"."""
        text = self.message.lower()
        return "no task" in text or "task-not-exist" in text
