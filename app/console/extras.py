"""How the console presents a task, and the features other modules bring.

Deliveries and redelivery, stored outputs and erasure, and job statistics are domain
functions of their own modules; the console calls those same functions. Where a module
is not part of this build, ``has()`` is false and the console leaves out the page or
button that needs it instead of failing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.responses import Response

from app.api.deps import task_out
from app.errors import NotFound
from app.lifecycle import Status
from app.models import Task
from app.schemas import TaskOut
from app.tasks import Ctx

WINDOWS = ("24h", "7d", "30d")


def _function(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def has(feature: str) -> bool:
    return _FEATURES[feature]() is not None


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
    input_src: str | None
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
    erased_at = getattr(api, "images_erased_at", None) or getattr(task, "images_erased_at",
                                                                  None)
    gateway_outputs = f"{ctx.settings.public_url}/v1/tasks/"
    outputs = []
    for i, out in enumerate(api.outputs):
        extra = out.model_dump()
        src: str | None = out.url
        if erased_at is not None:
            src = None
        elif out.url.startswith(gateway_outputs):
            src = f"/console/tasks/{api.id}/outputs/{i}"
        outputs.append(OutputView(
            index=i, name=out.name, src=src, content_type=out.content_type, size=out.size,
            width=extra.get("width"), height=extra.get("height"), sha256=extra.get("sha256"),
            upstream_url=out.upstream_url))
    input_src = None if erased_at is not None else api.input.get("inputImageUrl")
    return TaskView(api=api, client=task.client, erased_at=erased_at, input_src=input_src,
                    outputs=outputs)


def actions(view: TaskView) -> dict[str, bool]:
    return {
        "cancel": not view.terminal,
        "redeliver": has("redeliver") and view.terminal and bool(view.api.webhook_url),
        "erase": has("erase") and view.erased_at is None,
    }


# ---------------------------------------------------------------- other modules' features

_FEATURES: dict[str, Any] = {
    "deliveries": lambda: None,
    "redeliver": lambda: None,
    "erase": lambda: None,
    "output": lambda: None,
    "stats": lambda: None,
}


async def deliveries(ctx: Ctx, *, task_id: str, client: str | None) -> list[Any] | None:
    """The task's notification attempts, or None where this build has none."""
    fn = _FEATURES["deliveries"]()
    if fn is None:
        return None
    return list(await fn(ctx, task_id=task_id, client=client))


async def act(action: str, ctx: Ctx, *, task_id: str, client: str | None) -> None:
    fn = _FEATURES[action]()
    if fn is None:
        raise NotFound(f"No action {action!r}.")
    await fn(ctx, task_id=task_id, client=client)


async def output(ctx: Ctx, *, task_id: str, index: int, client: str | None) -> Response:
    fn = _FEATURES["output"]()
    if fn is None:
        raise NotFound("This gateway does not store outputs.")
    return await fn(ctx, task_id=task_id, index=index, client=client)


async def stats(ctx: Ctx, viewer: Any, *, window: str, client: str | None) -> Any:
    fn = _FEATURES["stats"]()
    if fn is None:
        return None
    return await fn(ctx, viewer, window=window, client=client)
