"""Request-scoped helpers: the context, the caller, and presenting tasks."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.clients import MAX_KEY_LEN, Principal, key_digest
from app.errors import TooManyRequests, Unauthorized
from app.gate import PRINCIPAL
from app.lifecycle import Status
from app.models import Event, Task
from app.schemas import EventOut, TaskError, TaskOut, TaskOutput, UpstreamRef
from app.tasks import Ctx
from app.wakeup import Hub


def ctx_of(request: Request) -> Ctx:
    return request.app.state.ctx


async def get_ctx(request: Request) -> Ctx:
    """``ctx_of`` as a dependency: async, or FastAPI would run it in its thread pool (a
    thread hop on every request)."""
    return ctx_of(request)


# Declares the scheme in the OpenAPI spec only; ``principal`` reads the header itself so
# that every refusal is the same problem+json 401.
bearer = HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                    description="A client key: `Authorization: Bearer <key>`.")


async def principal(request: Request,
                    _credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Security(bearer)] = None) -> Principal:
    """The caller the edge gate authenticated (``app.gate``: bearer key, then the
    client's request rate limit, before the body is read). Without the gate in front,
    the same checks here."""
    found = request.scope.get(PRINCIPAL)
    if isinstance(found, Principal):
        return found
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Missing or malformed bearer token.")
    caller = await principal_for_key(request, key.strip())
    wait = (request.app.state.rate_limiter.take(
        caller.client, rate=caller.limits.rate_per_s, burst=caller.limits.burst)
        if caller.limits.limits(request.method) else 0.0)
    if wait > 0:
        raise TooManyRequests(
            f"Over this client's limit of {caller.limits.rate_per_s:g} requests/s; "
            f"retry after {math.ceil(wait)}s.",
            headers={"Retry-After": str(math.ceil(wait))})
    return caller


async def principal_for_key(request: Request, key: str) -> Principal:
    """A client key → its Principal. The API's bearer header and the console's sign-in
    form both come through here."""
    if not key or len(key) > MAX_KEY_LEN:
        raise Unauthorized("Missing or malformed bearer token.")
    return await principal_for_digest(request, key_digest(key))


async def principal_for_digest(request: Request, digest: bytes) -> Principal:
    """The client whose key has this SHA-256 digest: a bootstrap key (compared in
    constant time) or a stored one (``app.clients.Keyring``, cached a few seconds).

    The console keeps only the digest in its server-side session and resolves it here on
    every request, so a key that stops being valid ends its console sessions too.
    """
    found = await request.app.state.keyring.authenticate_digest(ctx_of(request).sm, digest)
    if found is None:
        raise Unauthorized("Unknown API key.")
    return found


async def get_hub(request: Request) -> Hub:
    """The process's waiters (app/wakeup.py)."""
    return request.app.state.hub


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
        images_erased_at=t.images_erased_at,
    )


def event_out(e: Event) -> EventOut:
    return EventOut.model_validate({"id": e.id, "at": e.at, "source": e.source,
                                    "kind": e.kind, "status": e.status,
                                    "upstream_status": e.upstream_status,
                                    "message": e.message})
