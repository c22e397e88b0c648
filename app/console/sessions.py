"""Console sessions: a random token in an httpOnly cookie, the rest on the server.

The cookie carries only a random token. The database keeps its SHA-256 (a copy of the
table opens no session), the SHA-256 of the client key it was opened with, the client's
name and a per-session CSRF token. Every request resolves the key digest again through
the API's own ``principal_for_digest``, so whatever the API accepts is what the console
accepts, and a key that is revoked ends its console sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select

from app.context import Ctx
from app.db import unit_of_work
from app.ids import sha256_hex
from app.models import ConsoleSession

SESSION_TTL = timedelta(hours=12)


@dataclass(frozen=True)
class OpenedSession:
    token: str  # for the cookie only; never stored
    csrf_token: str


async def open_session(ctx: Ctx, *, key_digest: bytes, client: str) -> OpenedSession:
    """Record a new session for a key that has just been accepted."""
    now = ctx.clock()
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    async with unit_of_work(ctx.sm) as s:
        # Sign-ins are rare: a good moment to forget expired sessions.
        await s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
        s.add(
            ConsoleSession(
                id=sha256_hex(token),
                key_hash=key_digest.hex(),
                client=client,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + SESSION_TTL,
            )
        )
    return OpenedSession(token=token, csrf_token=csrf)


async def find_session(ctx: Ctx, *, token: str) -> ConsoleSession | None:
    """The live session for a cookie token, or None (unknown, malformed or expired)."""
    if not token or len(token) > 100:
        return None
    async with ctx.sm() as s:
        row = (
            await s.scalars(select(ConsoleSession).where(ConsoleSession.id == sha256_hex(token)))
        ).first()
    if row is None or row.expires_at <= ctx.clock():
        return None
    return row


async def close_session(ctx: Ctx, *, token: str) -> None:
    async with unit_of_work(ctx.sm) as s:
        await s.execute(delete(ConsoleSession).where(ConsoleSession.id == sha256_hex(token)))


def csrf_matches(session: ConsoleSession, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(
        session.csrf_token.encode(), (submitted or "").encode()
    )
