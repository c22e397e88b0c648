"""ORM rows only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column
from sqlalchemy.orm.instrumentation import manager_of_class

from app.db import Base, UTCDateTime

Json = JSON().with_variant(JSONB(), "postgresql")
TS = UTCDateTime()

# The partial task indexes' conditions (migration 0023 writes the same).
_DUE = "next_check_at IS NOT NULL"
_KEYED = "idempotency_key IS NOT NULL"
_UNERASED = "images_erased_at IS NULL AND completed_at IS NOT NULL"


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    status_rank: Mapped[int] = mapped_column(Integer)
    input: Mapped[dict[str, Any]] = mapped_column(Json)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", Json, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text)

    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    upstream_task_id: Mapped[str | None] = mapped_column(String(64))
    upstream_token: Mapped[str | None] = mapped_column(String(128))  # Wiro's socketaccesstoken
    upstream_status: Mapped[str | None] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer, default=0)

    outputs: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    cost_usd: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)
    upstream_error_code: Mapped[str | None] = mapped_column(String(16))

    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)
    completed_at: Mapped[datetime | None] = mapped_column(TS)
    deadline_at: Mapped[datetime] = mapped_column(TS)

    # Work scheduling: when a worker should next look at the task, and who holds it.
    next_check_at: Mapped[datetime | None] = mapped_column(TS)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(TS)
    retries: Mapped[int] = mapped_column(Integer, default=0)  # dispatch retries or polls
    hint_at: Mapped[datetime | None] = mapped_column(TS)  # last accepted callback
    first_miss_at: Mapped[datetime | None] = mapped_column(TS)  # "There is no task yet."
    first_error_at: Mapped[datetime | None] = mapped_column(TS)  # task_error seen
    cancel_requested_at: Mapped[datetime | None] = mapped_column(TS)
    upstream_started_at: Mapped[datetime | None] = mapped_column(TS)
    images_erased_at: Mapped[datetime | None] = mapped_column(TS)  # DELETE …/images, retention
    # The creating request's W3C trace context (tracing on only): the notification
    # continues that trace (app/tracing.py).
    traceparent: Mapped[str | None] = mapped_column(String(55))

    __table_args__ = (
        Index("ix_tasks_client_id", "client", "id"),
        Index("ix_tasks_client_status_id", "client", "status", "id"),
        Index("ix_tasks_status_id", "status", "id"),
        # Partial (0023): a terminal task, due never (NULL), leaves it, so it holds the
        # live tasks only; every query of it bounds the due time (``Leases``).
        Index(
            "ix_tasks_next_check_at",
            "next_check_at",
            sqlite_where=text(_DUE),
            postgresql_where=text(_DUE),
        ),
        # Partial (0023): a task without a key is in no entry of it, so its
        # insert writes no page of it; NULL keys never collided anyway.
        Index(
            "uq_tasks_client_idempotency_key",
            "client",
            "idempotency_key",
            unique=True,
            sqlite_where=text(_KEYED),
            postgresql_where=text(_KEYED),
        ),
        # The retention sweep: tasks not yet erased, oldest completion first. Partial
        # (0023): a task enters it when it completes, not at its insert.
        Index(
            "ix_tasks_completed_at_unerased",
            "completed_at",
            sqlite_where=text(_UNERASED),
            postgresql_where=text(_UNERASED),
        ),
    )


class TaskMetadata(Base):
    """One ``metadata`` pair of a task, copied from ``tasks.metadata`` when the task is
    created (metadata never changes afterwards). ``(key, value, task_id)`` makes a history
    filter on one pair an index range scan in id order, newest first."""

    __tablename__ = "task_metadata"

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))

    __table_args__ = (Index("ix_task_metadata_key_value_task_id", "key", "value", "task_id"),)


class Attempt(Base):
    """One submission of a task to Wiro. The callback token names the attempt."""

    __tablename__ = "task_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    token_hash: Mapped[str] = mapped_column(String(64))
    sent_at: Mapped[datetime] = mapped_column(TS)
    # sent → accepted | rejected | not_sent | ambiguous | abandoned | extra_killed
    outcome: Mapped[str] = mapped_column(String(20))
    upstream_task_id: Mapped[str | None] = mapped_column(String(64))
    # An upstream task id named by a callback for this attempt, not yet verified.
    hint_upstream_id: Mapped[str | None] = mapped_column(String(64))
    resolved_at: Mapped[datetime | None] = mapped_column(TS)
    # When the Run became of unknown outcome (timed out, or its sender died): the wait
    # before a new attempt counts from here.
    ambiguous_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (Index("uq_task_attempts_task_id_number", "task_id", "number", unique=True),)


class Event(Base):
    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(TS)
    source: Mapped[str] = mapped_column(String(20))
    # What the event records (app.states.EventKind): readers decide on this, never on
    # ``message``. Null only on rows a gateway older than migration 0021 wrote while a
    # rolling upgrade ran (the migration backfilled every earlier row).
    kind: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str | None] = mapped_column(String(20))
    upstream_status: Mapped[str | None] = mapped_column(String(40))
    message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_task_events_task_id_id", "task_id", "id"),)


class Client(Base):
    """A calling service. Its limits; ``None`` takes the gateway-wide default."""

    __tablename__ = "clients"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    rate_per_s: Mapped[float | None] = mapped_column(Float)  # 0 = no rate limit
    max_in_flight: Mapped[int | None] = mapped_column(Integer)  # 0 = no per-client cap
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)


class ClientKey(Base):
    """One API key of a client: only its SHA-256 and a short non-secret prefix are kept."""

    __tablename__ = "client_keys"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    client: Mapped[str] = mapped_column(ForeignKey("clients.name", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        Index("uq_client_keys_key_hash", "key_hash", unique=True),
        Index("uq_client_keys_prefix", "prefix", unique=True),
        Index("ix_client_keys_client", "client"),
    )


class ConsoleSession(Base):
    """A signed-in operator console session. The browser holds a random token; only its
    SHA-256 is kept here, with the SHA-256 of the client key it was opened with (resolved
    again on every request, so a revoked key ends its sessions) and its CSRF token."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(cookie token)
    key_hash: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(100))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)

    __table_args__ = (Index("ix_console_sessions_expires_at", "expires_at"),)


class Delivery(Base):
    """One notification of a task's terminal event to its ``webhook_url`` (the outbox row,
    written in the transaction of the terminal status change, or by a redeliver)."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id, msg_…
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(40))  # task.succeeded, …
    reason: Mapped[str] = mapped_column(String(20))  # terminal | redeliver
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[str | None] = mapped_column(Text)  # the exact body, fixed at attempt 1
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS)  # None once finished
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        Index("ix_deliveries_task_id", "task_id"),
        Index("ix_deliveries_next_attempt_at", "next_attempt_at"),
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(TS)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)  # first KiB
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("uq_delivery_attempts_delivery_id_number", "delivery_id", "number", unique=True),
    )


class StoredOutput(Base):
    """One output of a succeeded task and the gateway's copy of it."""

    __tablename__ = "task_outputs"

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(255))
    upstream_url: Mapped[str] = mapped_column(Text)
    upstream_content_type: Mapped[str | None] = mapped_column(String(100))
    upstream_size: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(20))  # pending | stored | failed | erased
    storage_key: Mapped[str] = mapped_column(String(200))
    content_type: Mapped[str | None] = mapped_column(String(100))
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)
    stored_at: Mapped[datetime | None] = mapped_column(TS)
    next_try_at: Mapped[datetime | None] = mapped_column(TS)  # None unless pending
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (Index("ix_task_outputs_next_try_at", "next_try_at"),)


class Upload(Base):
    """A photo a client uploaded (``POST /v1/uploads``), kept so erasure can find it."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # unguessable; in the URL
    client: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(10))  # local | wiro
    url: Mapped[str] = mapped_column(Text)
    url_hash: Mapped[str] = mapped_column(String(64))  # sha256(url): erasure looks it up
    storage_key: Mapped[str | None] = mapped_column(String(200))  # local mode only
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TS)
    erased_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        Index("ix_uploads_url_hash", "url_hash"),
        Index("ix_uploads_created_at", "created_at"),
    )


class Erasure(Base):
    """A task's images being erased: the files to delete here and Wiro's copies to delete
    there (``Task/InputOutputDelete``), retried by a worker until done."""

    __tablename__ = "erasures"

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(String(20))  # request | retention
    requested_at: Mapped[datetime] = mapped_column(TS)
    keys: Mapped[list[str]] = mapped_column(Json, default=list)  # store keys to delete
    upstream_state: Mapped[str] = mapped_column(String(20))  # pending|done|skipped|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(TS)
    next_try_at: Mapped[datetime | None] = mapped_column(TS)  # None once finished
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (Index("ix_erasures_next_try_at", "next_try_at"),)


_Row = TypeVar("_Row", bound=Base)
_names: dict[type[Any], frozenset[str]] = {}  # each class's attribute names, for ``detached``


def detached(cls: type[_Row], values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> _Row:
    """An instance of ``cls`` with ``values`` (by attribute name) put straight into its
    dict, as the ORM's loader fills one: no instrumented attribute sets, each with its
    events, as ``cls(**values)`` makes (the two objects of a submit cost 220 Python calls
    that way: docs/benchmarks.md, "forty-eighth round"). For objects that are read, and
    changed, but never added to a session (a claimed task's snapshot; a submit's task
    and first attempt, which Core statements write). An attribute left out reads None;
    a name that is not an attribute is refused, as the constructor refuses it."""
    mapper = cls.__mapper__
    if not mapper.configured:  # a fresh process whose first ORM use this is
        configure_mappers()
    if isinstance(values, Mapping):
        names = _names.get(cls)
        if names is None:
            names = _names[cls] = frozenset(mapper.attrs.keys())
        if not names >= values.keys():  # as ``cls(**values)`` refuses them
            raise TypeError(f"{sorted(values.keys() - names)!r}: not attributes of {cls.__name__}")
    row: _Row = manager_of_class(cls).new_instance()
    row.__dict__.update(values)
    return row
