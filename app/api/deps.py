"""Request-scoped helpers: the context, the caller, and presenting tasks."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from app.errors import Unauthorized
from app.models import Event, Task
from app.schemas import EventOut, TaskError, TaskOut, TaskOutput, UpstreamRef
from app.tasks import Ctx


@dataclass(frozen=True)
class Principal:
    client: str
    admin: bool

    @property
    def scope(self) -> str | None:
        """The client whose tasks this caller may see; None = every client."""
        return None if self.admin else self.client


def get_ctx(request: Request) -> Ctx:
    return request.app.state.ctx


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def principal(request: Request) -> Principal:
    """Bearer auth against the configured keys (compared as digests, in constant time)."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > 512:
        raise Unauthorized("Missing or malformed bearer token.")
    ctx = get_ctx(request)
    wanted = _digest(key)
    found = None
    for candidate, name in request.app.state.key_digests:
        if hmac.compare_digest(candidate, wanted):
            found = name
    if found is None:
        raise Unauthorized("Unknown API key.")
    return Principal(client=found, admin=found in ctx.settings.admin_client_names)


def key_digests(keys: dict[str, str]) -> list[tuple[bytes, str]]:
    return [(_digest(k), name) for k, name in keys.items()]


def task_out(t: Task) -> TaskOut:
    error = None
    if t.error_code:
        error = TaskError(code=t.error_code, message=t.error_message or t.error_code,
                          upstream_code=t.upstream_error_code)
    return TaskOut(
        id=t.id, model=t.model, status=t.status, input=t.input,
        outputs=[TaskOutput(**{k: o.get(k) for k in ("name", "content_type", "size", "url",
                                                      "upstream_url")}) for o in t.outputs],
        error=error, upstream=UpstreamRef(task_id=t.upstream_task_id, status=t.upstream_status),
        cost_usd=t.cost_usd, metadata=t.metadata_ or {}, webhook_url=t.webhook_url,
        created_at=t.created_at, updated_at=t.updated_at, completed_at=t.completed_at,
    )


def event_out(e: Event) -> EventOut:
    return EventOut(id=e.id, at=e.at, source=e.source, status=e.status,
                    upstream_status=e.upstream_status, message=e.message)
