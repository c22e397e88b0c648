"""Request-scoped helpers: the context and the caller (tasks are presented by
``app.schemas.task_out``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from fastapi import Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase

from app import logs
from app.clients import MAX_KEY_LEN, Principal, key_digest
from app.context import Ctx
from app.errors import TooManyRequests, Unauthorized
from app.gate import PRINCIPAL
from app.wakeup import Hub


def log_task_id(path_params: Mapping[str, Any]) -> None:
    """Every log line of a request about one task names it."""
    task_id = path_params.get("task_id")
    if task_id:
        logs.bind(task_id=str(task_id)[:40])


def ctx_of(request: Request) -> Ctx:
    return cast(Ctx, request.app.state.ctx)


async def get_ctx(request: Request) -> Ctx:
    """``ctx_of`` as a dependency: async, or FastAPI would run it in its thread pool (a
    thread hop on every request)."""
    return ctx_of(request)


class BearerKey(SecurityBase):
    """The API's bearer scheme (``bearerAuth`` in the spec) as the dependency that names
    the caller: the one the edge gate authenticated (``app.gate``: bearer key, then the
    client's request rate limit, before the body is read). Without the gate in front, the
    same checks here, every refusal the same problem+json 401. (One dependency: a
    declared ``HTTPBearer`` under a function was two, each solved on every request.)"""

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="A client key: `Authorization: Bearer <key>`.")
        self.scheme_name = "bearerAuth"

    async def __call__(self, request: Request) -> Principal:
        found = request.scope.get(PRINCIPAL)
        if isinstance(found, Principal):
            return found
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("Missing or malformed bearer token.")
        caller = await principal_for_key(request, key.strip())
        wait = (
            request.app.state.rate_limiter.take(
                caller.client, rate=caller.limits.rate_per_s, burst=caller.limits.burst
            )
            if caller.limits.limits(request.method)
            else 0.0
        )
        if wait > 0:
            raise TooManyRequests(
                f"Over this client's limit of {caller.limits.rate_per_s:g} requests/s; "
                f"retry after {math.ceil(wait)}s.",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return caller


principal = BearerKey()


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
    return cast(Principal, found)


def hub_of(request: Request) -> Hub:
    """The process's waiters (app/wakeup.py)."""
    return cast(Hub, request.app.state.hub)


async def get_hub(request: Request) -> Hub:
    """``hub_of`` as a dependency."""
    return hub_of(request)
