"""API shapes only (pydantic); never the ORM classes."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.catalog import DEFAULT_MODEL, MODELS, check_url
from app.lifecycle import Status
from app.outbound import literal_refusal
from app.states import EventKind

if TYPE_CHECKING:
    from app.models import Event, Task

MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE = 500
MAX_METADATA_KEY = 40


def _input_schema() -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for p in MODELS[DEFAULT_MODEL]:
        if p.kind == "select":
            props[p.name] = {"type": "string", "enum": list(p.options), "default": p.default}
        elif p.kind == "integer":
            props[p.name] = {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 4294967295},
                    {"type": "string", "pattern": "^[0-9]{1,10}$"},
                ],
                "default": p.default,
            }
        else:
            props[p.name] = {"type": "string", "format": "uri", "maxLength": 2048}
            required.append(p.name)
        if p.help:
            props[p.name]["description"] = p.help
    return {
        "type": "object",
        "title": "HeadshotInput",
        "properties": props,
        "required": required,
        "additionalProperties": False,
        "description": "The model's own parameter names; omitted inputs take the "
        "model's defaults. Validated against the model's parameter sheet.",
    }


InputField = Annotated[dict[str, Any], WithJsonSchema(_input_schema())]


def unstorable(value: Any, depth: int = 0) -> str | None:
    """Why a JSON value could not be stored as given, or None: PostgreSQL text and jsonb
    take no NUL character, and no encoding takes a lone surrogate (JSON's ``\\ud800``)."""
    if depth > 32:
        return "nested too deeply"
    if isinstance(value, str):
        if "\x00" in value:
            return "strings must not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "strings must be valid Unicode (no lone surrogates)"
        return None
    if isinstance(value, dict):
        items: list[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        if (why := unstorable(item, depth + 1)) is not None:
            return why
    return None


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(
        DEFAULT_MODEL, max_length=200, json_schema_extra={"enum": list(MODELS)}
    )
    input: InputField
    webhook_url: StrictStr | None = Field(None, max_length=2048)
    metadata: dict[StrictStr, StrictStr] | None = Field(
        None,
        description=f"At most {MAX_METADATA_KEYS} string keys to string values of at "
        f"most {MAX_METADATA_VALUE} characters; filterable in history.",
    )

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if (why := unstorable(data)) is not None:
            raise ValueError(why)
        return data

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and (why := check_url(v)):
            raise ValueError(f"webhook_url {why}")
        return v

    def webhook_refusal(self, *, allow_private: bool) -> dict[str, Any] | None:
        """The validation error of a ``webhook_url`` whose host is a literal address the
        notifier would refuse (``app.outbound.refusal``: loopback, private, metadata, also
        embedded in IPv6), or None. Needs the setting, so the route asks after parsing;
        names are judged when they are resolved, at delivery."""
        if self.webhook_url is None:
            return None
        why = literal_refusal(self.webhook_url, allow_private=allow_private)
        if why is None:
            return None
        return {"loc": ["webhook_url"], "msg": f"the gateway never delivers to this host: {why}"}

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for k, val in v.items():
            if (
                not k
                or len(k) > MAX_METADATA_KEY
                or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in k)
            ):
                raise ValueError(f"keys are 1-{MAX_METADATA_KEY} characters of [A-Za-z0-9_.-]")
            if len(val) > MAX_METADATA_VALUE:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters")
        return v


class TaskOutput(BaseModel):
    """One output. Once the gateway has stored its copy, ``url`` is the gateway's
    (``/v1/tasks/{id}/outputs/{index}``, same auth as the task) and ``sha256``, ``size``,
    ``width``, ``height`` describe that copy; until then ``url`` is Wiro's."""

    name: str
    content_type: str | None = None
    size: int | None = None
    url: str
    upstream_url: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None


class TaskError(BaseModel):
    code: str
    message: str
    upstream_code: str | None = None


class UpstreamRef(BaseModel):
    task_id: str | None
    status: str | None


class TaskOut(BaseModel):
    id: str
    model: str
    status: Status
    input: dict[str, str]
    outputs: list[TaskOutput]
    error: TaskError | None
    upstream: UpstreamRef
    cost_usd: str | None
    metadata: dict[str, str]
    webhook_url: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    images_erased_at: datetime | None = Field(
        None,
        description="when the task's images were erased (on request or by retention); "
        "its output URLs answer 410 from then on",
    )


class TaskPage(BaseModel):
    data: list[TaskOut]
    next_cursor: str | None


class DeliveryAttemptOut(BaseModel):
    number: int
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null if none")
    latency_ms: int
    response_body: str | None = Field(description="the first KiB of the receiver's answer")
    error: str | None


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header of every attempt of this delivery")
    type: str = Field(description="task.succeeded | task.failed | task.cancelled | task.timed_out")
    reason: Literal["terminal", "redeliver"]
    url: str
    status: Literal["pending", "delivered", "failed"]
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    attempts: list[DeliveryAttemptOut]


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
    next_cursor: str | None = Field(
        None, description="pass as `cursor` for the next page; null on the last one"
    )


class UploadOut(BaseModel):
    url: str = Field(description="pass it as input.inputImageUrl")
    content_type: Literal["image/jpeg", "image/png"]
    size: int = Field(description="bytes, after metadata was stripped")
    width: int
    height: int


class EventOut(BaseModel):
    id: int
    at: datetime
    source: Literal["api", "callback", "poll", "dispatcher", "cancel", "timeout", "delivery"]
    kind: EventKind | None = Field(
        description="what the event records; decide on this (with `status`), never on "
        "`message`, whose wording is for people and may change. Null only for "
        "an event written by a gateway release older than this field while a "
        "rolling upgrade was under way"
    )
    status: Status | None = Field(
        description="the status the task moved to, when this event is a transition; "
        "null for events that changed no status"
    )
    upstream_status: str | None
    message: str | None


class EventList(BaseModel):
    data: list[EventOut]
    next_cursor: str | None = Field(
        description="the next page's `cursor`; null when there are no more events now "
        "(to follow a live task, use the event stream)"
    )


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: str
    detail: str | None = None


class StatusCounts(BaseModel):
    pending: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    timed_out: int


class DurationStats(BaseModel):
    count: int = Field(description="tasks measured")
    p50_s: float | None = Field(description="median, seconds; null when nothing was measured")
    p95_s: float | None = Field(description="95th percentile, seconds")


class FinishedBy(BaseModel):
    callback: int = Field(description="terminal status applied after a Wiro callback")
    poll: int = Field(description="terminal status found by a scheduled poll")
    other: int = Field(description="rejected at dispatch, cancelled before dispatch, or timed out")


class DurationSample(BaseModel):
    rows: int = Field(description="tasks the percentiles were computed over")
    limit: int
    truncated: bool = Field(
        description="true when the window held more tasks than "
        "`limit`: percentiles describe the newest `limit`"
    )


class TaskStatsOut(BaseModel):
    window: str
    since: datetime
    until: datetime
    client: str | None = Field(description="the client counted; null = every client")
    total: int
    counts: StatusCounts
    success_rate: float | None = Field(
        description="succeeded / terminal tasks; null when none is terminal"
    )
    queue_time: DurationStats = Field(
        description="created → accepted by Wiro, over tasks Wiro accepted"
    )
    run_time: DurationStats = Field(
        description="accepted by Wiro → completed, over succeeded tasks"
    )
    end_to_end: DurationStats = Field(description="created → completed, over succeeded tasks")
    cost_usd: str = Field(description="sum of Wiro's totalcost, as an exact decimal string")
    finished_by: FinishedBy
    durations: DurationSample


# ---------------------------------------------------------------- rows → API shapes


def task_out(t: Task) -> TaskOut:
    """A task as the API shows it (``GET /v1/tasks/{id}``, its notifications, the console)."""
    error = None
    if t.error_code:
        error = TaskError(
            code=t.error_code,
            message=t.error_message or t.error_code,
            upstream_code=t.upstream_error_code,
        )
    return TaskOut(
        id=t.id,
        model=t.model,
        status=Status(t.status),
        input=t.input,
        outputs=[TaskOutput.model_validate(o) for o in t.outputs],
        error=error,
        upstream=UpstreamRef(task_id=t.upstream_task_id, status=t.upstream_status),
        cost_usd=t.cost_usd,
        metadata=t.metadata_ or {},
        webhook_url=t.webhook_url,
        created_at=t.created_at,
        updated_at=t.updated_at,
        completed_at=t.completed_at,
        images_erased_at=t.images_erased_at,
    )


def event_out(e: Event) -> EventOut:
    """An event as the API shows it (its history and event streams)."""
    return EventOut.model_validate(
        {
            "id": e.id,
            "at": e.at,
            "source": e.source,
            "kind": e.kind,
            "status": e.status,
            "upstream_status": e.upstream_status,
            "message": e.message,
        }
    )
