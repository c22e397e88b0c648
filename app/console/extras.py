"""How the console presents a task, and what it shows from the other domain modules.

Deliveries and redelivery (``app.notify``), stored outputs and erasure (``app.results``)
and job statistics (``app.stats``) are called exactly as the API's routes call them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from markupsafe import Markup
from starlette.responses import Response

from app import notify, results, uploads
from app import stats as job_stats
from app.console import charts
from app.context import Ctx
from app.errors import NotFound
from app.lifecycle import Status
from app.models import Task
from app.outbox import Services
from app.schemas import DeliveryList, DeliveryOut, TaskOut, task_out
from app.tasks import get_task

WINDOWS = ("24h", "7d", "30d")


# ---------------------------------------------------------------- presenting a task


@dataclass
class OutputView:
    index: int
    name: str
    src: str | None  # what <img src> gets; None once erased
    content_type: str | None
    size: int | None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    upstream_url: str | None = None


@dataclass
class TaskView:
    api: TaskOut  # exactly what the API returns for this task
    client: str
    erased_at: datetime | None
    input_src: str | None  # the console's own route, for an upload stored here; else None
    input_url: str | None  # the caller's inputImageUrl: shown as a link, never loaded
    outputs: list[OutputView] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.api.id

    @property
    def terminal(self) -> bool:
        return Status(self.api.status).terminal


def present(ctx: Ctx, task: Task) -> TaskView:
    """The API's view of the task plus what a page needs: image sources. Outputs stored
    by the gateway are served to the browser by the console's own auth-checked route."""
    api = task_out(task)
    erased_at = api.images_erased_at
    gateway_outputs = f"{ctx.settings.public_url}/v1/tasks/"
    outputs = []
    for i, out in enumerate(api.outputs):
        src: str | None = out.url
        if erased_at is not None:
            src = None
        elif out.url.startswith(gateway_outputs):
            src = f"/console/tasks/{api.id}/outputs/{i}"
        outputs.append(
            OutputView(
                index=i,
                name=out.name,
                src=src,
                content_type=out.content_type,
                size=out.size,
                width=out.width,
                height=out.height,
                sha256=out.sha256,
                upstream_url=out.upstream_url,
            )
        )
    input_url = api.input.get("inputImageUrl") or None
    input_src = None
    if erased_at is None and input_url and local_upload(ctx, input_url) is not None:
        input_src = f"/console/tasks/{api.id}/input"
    return TaskView(
        api=api,
        client=task.client,
        erased_at=erased_at,
        input_src=input_src,
        input_url=None if erased_at is not None else input_url,
        outputs=outputs,
    )


def local_upload(ctx: Ctx, url: str) -> tuple[str, str] | None:
    """``(upload_id, name)`` if ``url`` is an upload this gateway stores and serves
    (``GATEWAY_UPLOAD_MODE=local``), else None. Any other input URL is the caller's
    choice: the console never makes the operator's browser fetch it."""
    prefix = f"{ctx.settings.public_url}/files/"
    if not url.startswith(prefix):
        return None
    upload_id, sep, name = url.removeprefix(prefix).partition("/")
    if not sep or not upload_id or not name or "/" in name or "?" in name or "#" in name:
        return None
    return upload_id, name


def actions(view: TaskView) -> dict[str, bool]:
    """The buttons that can do something (the domain functions still decide: a race
    with the task's own progress ends as the API's 409, shown on the page)."""
    return {
        "cancel": not view.terminal,
        "redeliver": view.terminal and bool(view.api.webhook_url),
        "erase": view.terminal and view.erased_at is None,
    }


# ---------------------------------------------------------------- other modules' features


async def deliveries(svc: Services, *, task_id: str, client: str | None) -> list[DeliveryOut]:
    """The task's notifications and their attempts, as ``GET …/deliveries`` shows them."""
    rows, _ = await notify.list_deliveries(svc, task_id=task_id, client=client, limit=200)
    return DeliveryList.model_validate({"data": notify.presentable(rows)}).data


async def act(action: str, svc: Services, *, task_id: str, client: str | None) -> None:
    if action == "redeliver":
        await notify.redeliver(svc, task_id=task_id, client=client)
    elif action == "erase":
        await results.erase_task_images(svc, task_id=task_id, client=client)
    else:
        raise NotFound(f"No action {action!r}.")


async def output(svc: Services, *, task_id: str, index: int, client: str | None) -> Response:
    """The stored image, through the function behind ``GET /v1/tasks/{id}/outputs/{i}``."""
    data, row = await results.open_output(svc, task_id=task_id, index=index, client=client)
    return image(data, row.content_type, etag=row.sha256)


async def input_image(svc: Services, *, task_id: str, client: str | None) -> Response:
    """The task's input photo, only where it is an upload stored here by the task's own
    client (``uploads.open_upload``, as ``GET /files/…`` serves it to Wiro)."""
    task = await get_task(svc.ctx, task_id=task_id, client=client)
    url = (task.input or {}).get("inputImageUrl")
    where = local_upload(svc.ctx, url) if isinstance(url, str) else None
    if where is None or task.images_erased_at is not None:
        raise NotFound("This task's input photo is not stored by the gateway.")
    data, row = await uploads.open_upload(svc, upload_id=where[0], name=where[1])
    if row.client != task.client:
        raise NotFound("This task's input photo is not stored by the gateway.")
    return image(data, row.content_type, etag=row.sha256)


def image(data: bytes, content_type: str | None, *, etag: str | None) -> Response:
    """A stored image for the operator's browser: never kept in a cache (an erased image
    must not outlive its erasure there), as the API serves them."""
    headers = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
    if etag:
        headers["ETag"] = f'"{etag}"'
    return Response(data, media_type=content_type, headers=headers)


# ---------------------------------------------------------------- statistics


@dataclass
class StatsView:
    scope_label: str
    since: datetime
    until: datetime
    total: int
    counts: list[tuple[str, int]]
    success_rate_label: str
    cost_total: Decimal
    times: list[tuple[str, float | None, float | None]]
    cost_per_day: list[tuple[str, Decimal, int]]
    finished_by: list[tuple[str, int]]
    status_chart: Markup
    times_chart: Markup
    cost_chart: Markup


async def stats(ctx: Ctx, *, scope: str | None, window: str) -> StatsView:
    """``app.stats`` as ``GET /v1/stats`` calls it, drawn.

    ``scope`` is what the API computes from the caller: their own client, the chosen one
    for an admin key, or None (every client)."""
    span = job_stats.parse_window(window)
    s = await job_stats.task_stats(ctx, client=scope, window=span)
    daily = [
        (str(d), Decimal(c), int(n))
        for d, c, n in await job_stats.cost_per_day(ctx, client=scope, window=span)
    ]
    counts = [(st.value, int(s.counts.get(st.value, 0))) for st in Status]
    times = [
        ("End-to-end time", s.end_to_end.p50_s, s.end_to_end.p95_s),
        ("Queue time", s.queue_time.p50_s, s.queue_time.p95_s),
        ("Run time", s.run_time.p50_s, s.run_time.p95_s),
    ]
    time_rows: list[tuple[str, float]] = []
    time_classes: list[str] = []
    for label, p50, p95 in times:
        time_rows += [(f"{label} p50", p50 or 0.0), (f"{label} p95", p95 or 0.0)]
        time_classes += ["p50", "p95"]
    return StatsView(
        scope_label="Every client" if scope is None else f"Client {scope}",
        since=s.since,
        until=s.until,
        total=sum(n for _, n in counts),
        counts=counts,
        success_rate_label=("—" if s.success_rate is None else f"{s.success_rate * 100:.1f} %"),
        cost_total=s.cost_usd,
        times=times,
        cost_per_day=daily,
        finished_by=sorted(
            ((k, int(v)) for k, v in s.finished_by.items() if v), key=lambda kv: -kv[1]
        ),
        status_chart=charts.bars(
            [(st.replace("_", " "), n) for st, n in counts],
            chart_id="chart-status",
            title="Tasks by status",
            fmt=lambda v: f"{v:.0f}",
            classes=[f"s-{st}" for st, _ in counts],
        ),
        times_chart=charts.bars(
            time_rows,
            chart_id="chart-times",
            title="p50 and p95 times, in seconds",
            classes=time_classes,
            fmt=lambda v: f"{v:.1f} s",
        ),
        cost_chart=charts.columns(
            [(d[5:], float(c)) for d, c, _ in daily],
            chart_id="chart-cost",
            title="Upstream cost per day, USD",
            fmt=lambda v: f"${v:.2f}" if v >= 1 else f"${v:.4f}",
        ),
    )
