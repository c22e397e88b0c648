"""Typed objects for what the gateway returns: plain dataclasses, one per API schema.

Each ``from_dict`` takes the API's JSON and ignores names it does not know, so a newer
gateway that adds a field does not break an older client. Timestamps become aware
``datetime`` objects, ``cost_usd`` a ``Decimal``. A field that only the client knows (not
in the API's schema) says so in its ``metadata`` (``{"client_only": True}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Status(StrEnum):
    """A task's status. Ranks only move forward; the last four are terminal."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


TERMINAL: frozenset[str] = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}
)


def _ts(value: Any) -> datetime:
    return datetime.fromisoformat(value)


def _ts_or_none(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, kw_only=True)
class Output:
    """One output image. ``url`` is the gateway's copy (same auth as the task) once stored."""

    name: str
    url: str
    content_type: str | None = None
    size: int | None = None
    upstream_url: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Output:
        return cls(
            name=d["name"],
            url=d["url"],
            content_type=d.get("content_type"),
            size=d.get("size"),
            upstream_url=d.get("upstream_url"),
            sha256=d.get("sha256"),
            width=d.get("width"),
            height=d.get("height"),
        )


@dataclass(frozen=True, kw_only=True)
class TaskError:
    """Why a task failed or timed out: a stable ``code`` and a message for people."""

    code: str
    message: str
    upstream_code: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskError:
        return cls(code=d["code"], message=d["message"], upstream_code=d.get("upstream_code"))


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """The task as Wiro knows it: its id there and its last upstream status."""

    task_id: str | None
    status: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Upstream:
        return cls(task_id=d.get("task_id"), status=d.get("status"))


@dataclass(frozen=True, kw_only=True)
class Task:
    """One run of one model for one client."""

    id: str
    model: str
    status: str
    input: dict[str, str]
    outputs: list[Output]
    error: TaskError | None
    upstream: Upstream
    cost_usd: Decimal | None
    metadata: dict[str, str]
    webhook_url: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    images_erased_at: datetime | None = None
    # True when POST /v1/tasks answered an earlier request's task (Idempotent-Replayed).
    replayed: bool = field(default=False, compare=False, metadata={"client_only": True})

    @property
    def done(self) -> bool:
        """Whether the status is terminal (it will never change again)."""
        return self.status in TERMINAL

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, replayed: bool = False) -> Task:
        error = d.get("error")
        cost = d.get("cost_usd")
        return cls(
            id=d["id"],
            model=d["model"],
            status=_status(d["status"]),
            input=dict(d.get("input") or {}),
            outputs=[Output.from_dict(o) for o in d.get("outputs") or []],
            error=None if error is None else TaskError.from_dict(error),
            upstream=Upstream.from_dict(d.get("upstream") or {}),
            cost_usd=None if cost is None else Decimal(cost),
            metadata=dict(d.get("metadata") or {}),
            webhook_url=d.get("webhook_url"),
            created_at=_ts(d["created_at"]),
            updated_at=_ts(d["updated_at"]),
            completed_at=_ts_or_none(d.get("completed_at")),
            images_erased_at=_ts_or_none(d.get("images_erased_at")),
            replayed=replayed,
        )


@dataclass(frozen=True, kw_only=True)
class Event:
    """One entry of a task's timeline. ``status`` is set when the event is a transition.

    ``kind`` says what the event records (``"created"``, ``"linked"``, ``"progressed"``,
    ``"upstream_status"``, ``"failed"``, ``"timed_out"``, ``"cancelled"``, ``"run_retry"``,
    ``"notification_delivered"``, …; the API's ``EventKind``): decide on it, not on
    ``message``, which is for people. A plain string, so a kind a newer gateway adds
    does not break this client; ``None`` only for events written during a rolling
    upgrade by a gateway older than the field."""

    id: int
    at: datetime
    source: str
    kind: str | None
    status: str | None
    upstream_status: str | None
    message: str | None

    @property
    def terminal(self) -> bool:
        """Whether this event moved the task to a terminal status."""
        return self.status in TERMINAL

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        status = d.get("status")
        return cls(
            id=int(d["id"]),
            at=_ts(d["at"]),
            source=d["source"],
            kind=d.get("kind"),
            status=None if status is None else _status(status),
            upstream_status=d.get("upstream_status"),
            message=d.get("message"),
        )


@dataclass(frozen=True, kw_only=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next one."""

    data: list[T]
    next_cursor: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeliveryAttempt:
    """One POST of a notification to the caller's webhook_url."""

    number: int
    at: datetime
    status_code: int | None
    latency_ms: int
    response_body: str | None
    error: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeliveryAttempt:
        return cls(
            number=d["number"],
            at=_ts(d["at"]),
            status_code=d.get("status_code"),
            latency_ms=d["latency_ms"],
            response_body=d.get("response_body"),
            error=d.get("error"),
        )


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One notification (its ``id`` is the ``webhook-id`` of every attempt)."""

    id: str
    type: str
    reason: str
    url: str
    status: str
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    attempts: list[DeliveryAttempt]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Delivery:
        return cls(
            id=d["id"],
            type=d["type"],
            reason=d["reason"],
            url=d["url"],
            status=d["status"],
            created_at=_ts(d["created_at"]),
            next_attempt_at=_ts_or_none(d.get("next_attempt_at")),
            finished_at=_ts_or_none(d.get("finished_at")),
            attempts=[DeliveryAttempt.from_dict(a) for a in d.get("attempts") or []],
        )


@dataclass(frozen=True, kw_only=True)
class WebhookEvent:
    """A verified notification: ``type`` is ``task.<status>``, ``data`` the task."""

    type: str
    timestamp: datetime
    data: Task

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WebhookEvent:
        return cls(type=d["type"], timestamp=_ts(d["timestamp"]), data=Task.from_dict(d["data"]))


def _status(value: str) -> str:
    """A known status as ``Status`` (a ``str``); an unknown one from a newer gateway as is."""
    try:
        return Status(value)
    except ValueError:
        return value
