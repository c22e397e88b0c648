"""Request-scoped helpers: the context, the caller, and presenting tasks."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from app.errors import Unauthorized
from app.lifecycle import Status
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


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def principal(request: Request) -> Principal:
    """Bearer auth: the header's key, resolved by ``principal_for_key``."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Missing or malformed bearer token.")
    return principal_for_key(request, key.strip())


def principal_for_key(request: Request, key: str) -> Principal:
    """A client key → its Principal. The API's bearer header and the console's sign-in
    form both come through here."""
    if not key or len(key) > 512:
        raise Unauthorized("Missing or malformed bearer token.")
    return principal_for_digest(request, key_digest(key))


def principal_for_digest(request: Request, digest: bytes) -> Principal:
    """The client whose key has this SHA-256 digest (compared in constant time).

    The console keeps only the digest in its server-side session and resolves it here on
    every request, so a key that stops being valid ends its console sessions too.
    """
    ctx = get_ctx(request)
    found = None
    for candidate, name in request.app.state.key_digests:
        if hmac.compare_digest(candidate, digest):
            found = name
    if found is None:
        raise Unauthorized("Unknown API key.")
    return Principal(client=found, admin=found in ctx.settings.admin_client_names)


def key_digests(keys: dict[str, str]) -> list[tuple[bytes, str]]:
    return [(key_digest(k), name) for k, name in keys.items()]


def task_out(t: Task) -> TaskOut:
    error = None
    if t.error_code:
        error = TaskError(code=t.error_code, message=t.error_message or t.error_code,
                          upstream_code=t.upstream_error_code)
    return TaskOut(
        id=t.id, model=t.model, status=Status(t.status), input=t.input,
        outputs=[TaskOutput.model_validate(o) for o in t.outputs],
        error=error, upstream=UpstreamRef(task_id=t.upstream_task_id, status=t.upstream_status),
        cost_usd=t.cost_usd, metadata=t.metadata_ or {}, webhook_url=t.webhook_url,
        created_at=t.created_at, updated_at=t.updated_at, completed_at=t.completed_at,
    )


def event_out(e: Event) -> EventOut:
    return EventOut.model_validate({"id": e.id, "at": e.at, "source": e.source,
                                    "status": e.status, "upstream_status": e.upstream_status,
                                    "message": e.message})
