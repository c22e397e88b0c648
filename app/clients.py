"""Clients and their API keys: create, rotate, revoke, list, and authenticate.

A key is ``hgw_`` followed by 43 URL-safe characters (256 random bits). The database
keeps only its SHA-256 and its first 12 characters (``prefix``), which name the key in
``keys list`` and ``keys revoke --key-prefix`` without revealing it: the other 240 bits
stay secret. Because the key is random, a plain SHA-256 is enough; a slow password hash
would only cost latency on every request.

A client has at most two live keys, so a key can be rotated with an overlap: create the
second, move the callers, revoke the first. Bootstrap keys from ``GATEWAY_API_KEYS`` keep
working beside the stored ones (they are not counted, listed by prefix, or revocable
here: remove them from the environment and restart).

``Keyring`` answers "whose key is this" for each request: bootstrap keys from memory,
stored keys from the database at most once per key per ``GATEWAY_KEY_CACHE_TTL_S``
(default 5 s). That TTL is the delay before a key revoked by ``headshot-gateway keys
revoke`` (another process) stops working in a running ``serve``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import unit_of_work, utcnow
from app.models import Client, ClientKey
from app.settings import Settings

_K = TypeVar("_K")
_V = TypeVar("_V")

KEY_PREFIX = "hgw_"
PREFIX_LEN = 12
MAX_LIVE_KEYS = 2
MAX_KEY_LEN = 512
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ClientKeyError(ValueError):
    """A key operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    rate_per_s: float = 0.0  # 0 = no request rate limit
    burst: float = 1.0  # bucket size, in requests
    max_in_flight: int = 0  # 0 = no per-client cap on tasks in flight
    # The gateway-wide default rate counts only requests that change something (POST,
    # DELETE, ...): a caller polling its tasks is never throttled by a default it did not
    # choose. A rate set for the client itself (`keys create --rate`) counts every request.
    reads_limited: bool = True

    def limits(self, method: str) -> bool:
        """Whether a request with ``method`` counts against the rate."""
        return self.reads_limited or method.upper() not in ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    client: str
    admin: bool
    limits: Limits = field(default_factory=Limits)

    @property
    def scope(self) -> str | None:
        """The client whose tasks this caller may see; None = every client."""
        return None if self.admin else self.client


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_hash(key: str) -> str:
    """What ``client_keys.key_hash`` stores: the hex SHA-256 of the key."""
    return key_digest(key).hex()


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ClientKeyError(
            f"client names are 1-100 characters of [A-Za-z0-9_.-], starting with a letter or "
            f"digit; got {name!r}"
        )
    return name


def limits_for(settings: Settings, rate_per_s: float | None, max_in_flight: int | None) -> Limits:
    """A client's limits: its own where set, else the gateway-wide defaults."""
    rate = settings.default_client_rate_per_s if rate_per_s is None else rate_per_s
    cap = settings.client_max_in_flight if max_in_flight is None else max_in_flight
    return Limits(
        rate_per_s=rate,
        burst=max(1.0, rate * settings.client_rate_burst_s),
        max_in_flight=cap,
        reads_limited=rate_per_s is not None,
    )


# ---------------------------------------------------------------- key management (CLI)


@dataclass(frozen=True)
class KeyInfo:
    client: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    rate_per_s: float | None
    max_in_flight: int | None


async def _client_row(s: AsyncSession, name: str, now: datetime, *, create: bool) -> Client | None:
    row = await s.get(Client, name, with_for_update=True)
    if row is None and create:
        row = Client(name=name, created_at=now, updated_at=now)
        s.add(row)
        await s.flush()
    return row


def _apply_limits(
    row: Client, rate_per_s: float | None, max_in_flight: int | None, now: datetime
) -> None:
    if rate_per_s is not None:
        if rate_per_s < 0:
            raise ClientKeyError("--rate must be >= 0 (0 = no limit)")
        row.rate_per_s = rate_per_s
    if max_in_flight is not None:
        if max_in_flight < 0:
            raise ClientKeyError("--max-in-flight must be >= 0 (0 = no cap)")
        row.max_in_flight = max_in_flight
    row.updated_at = now


async def _live_keys(s: AsyncSession, name: str) -> Sequence[ClientKey]:
    return (
        await s.scalars(
            select(ClientKey)
            .where(ClientKey.client == name, ClientKey.revoked_at.is_(None))
            .order_by(ClientKey.id)
        )
    ).all()


async def create_key(
    sm: async_sessionmaker[AsyncSession],
    *,
    client: str,
    admin: bool | None = None,
    rate_per_s: float | None = None,
    max_in_flight: int | None = None,
    now: datetime | None = None,
) -> tuple[str, KeyInfo]:
    """A new live key for ``client`` (created if new). Returns ``(key, info)``; the key
    is not stored and cannot be shown again.

    ``admin=None`` copies the scope of the client's newest live key (a rotation), else
    non-admin. Fails when the client already has ``MAX_LIVE_KEYS`` live keys.
    """
    check_name(client)
    now = now or utcnow()
    for _ in range(3):  # a prefix collision (48 random bits) is only retried
        key = new_key()
        async with unit_of_work(sm) as s:
            row = await _client_row(s, client, now, create=True)
            assert row is not None
            _apply_limits(row, rate_per_s, max_in_flight, now)
            live = await _live_keys(s, client)
            if len(live) >= MAX_LIVE_KEYS:
                raise ClientKeyError(
                    f"client {client!r} already has {len(live)} live keys "
                    f"({', '.join(k.prefix for k in live)}); revoke one first with "
                    f"`headshot-gateway keys revoke {client} --key-prefix PREFIX`"
                )
            prefix = key[:PREFIX_LEN]
            if await s.scalar(select(ClientKey.id).where(ClientKey.prefix == prefix)):
                continue
            scope = admin if admin is not None else (live[-1].admin if live else False)
            s.add(
                ClientKey(
                    client=client,
                    prefix=prefix,
                    key_hash=key_hash(key),
                    admin=scope,
                    created_at=now,
                )
            )
        return key, KeyInfo(
            client=client,
            prefix=prefix,
            admin=scope,
            created_at=now,
            revoked_at=None,
            rate_per_s=row.rate_per_s,
            max_in_flight=row.max_in_flight,
        )
    raise ClientKeyError("could not pick a unique key prefix; try again")


async def rotate_key(
    sm: async_sessionmaker[AsyncSession], *, client: str, now: datetime | None = None
) -> tuple[str, KeyInfo]:
    """A second live key with the scope of the current one (the overlap of a rotation)."""
    check_name(client)
    async with sm() as s:
        live = await _live_keys(s, client)
    if not live:
        raise ClientKeyError(
            f"client {client!r} has no live key to rotate; "
            f"use `headshot-gateway keys create {client}`"
        )
    return await create_key(sm, client=client, admin=None, now=now)


async def revoke_keys(
    sm: async_sessionmaker[AsyncSession],
    *,
    client: str,
    prefix: str | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Revoke every live key of ``client``, or only the one with ``prefix``. Returns the
    prefixes revoked; fails if nothing matched."""
    check_name(client)
    now = now or utcnow()
    async with unit_of_work(sm) as s:
        q = select(ClientKey).where(ClientKey.client == client, ClientKey.revoked_at.is_(None))
        if prefix is not None:
            q = q.where(ClientKey.prefix == prefix)
        rows = (await s.scalars(q)).all()
        if not rows:
            what = f"live key {prefix!r}" if prefix else "live key"
            raise ClientKeyError(f"client {client!r} has no {what}")
        await s.execute(
            update(ClientKey)
            .where(ClientKey.id.in_([r.id for r in rows]))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
    return [r.prefix for r in rows]


async def set_limits(
    sm: async_sessionmaker[AsyncSession],
    *,
    client: str,
    rate_per_s: float | None,
    max_in_flight: int | None,
    now: datetime | None = None,
) -> None:
    check_name(client)
    now = now or utcnow()
    async with unit_of_work(sm) as s:
        row = await _client_row(s, client, now, create=True)
        assert row is not None
        _apply_limits(row, rate_per_s, max_in_flight, now)


async def list_keys(sm: async_sessionmaker[AsyncSession]) -> list[KeyInfo]:
    async with sm() as s:
        rows = (
            await s.execute(
                select(ClientKey, Client)
                .join(Client, Client.name == ClientKey.client)
                .order_by(ClientKey.client, ClientKey.id)
            )
        ).all()
    return [
        KeyInfo(
            client=k.client,
            prefix=k.prefix,
            admin=k.admin,
            created_at=k.created_at,
            revoked_at=k.revoked_at,
            rate_per_s=c.rate_per_s,
            max_in_flight=c.max_in_flight,
        )
        for k, c in rows
    ]


async def stored_limits(
    sm: async_sessionmaker[AsyncSession],
) -> dict[str, tuple[float | None, int | None]]:
    """Every client's own limits (``None`` = the default), for the dispatcher."""
    async with sm() as s:
        rows = (await s.execute(select(Client.name, Client.rate_per_s, Client.max_in_flight))).all()
    return {name: (rate, cap) for name, rate, cap in rows}


# ---------------------------------------------------------------- authentication


class Keyring:
    """Who a bearer key belongs to, with a small per-process cache (see the module doc).

    Unknown keys are cached too, so a caller retrying a bad key does not reach the
    database on every request. Both caches hold at most ``MAX_ENTRIES`` entries and drop
    the least recently used one first, so a flood of random keys evicts random keys, not
    every good one at once.

    ``vouched`` answers, without a database read, whether a key is known good here (a
    bootstrap key, or one that authenticated in this process): the edge gate
    (``app.gate``) lets such keys past the penalty box for wrong keys. It only skips the
    penalty box: the key is still authenticated (and a revoked one refused) as usual.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._bootstrap = [(key_digest(k), name) for k, name in settings.client_keys.items()]
        self._keys: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._limits: dict[str, tuple[float, Limits]] = {}
        self._good: OrderedDict[bytes, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"Keyring(bootstrap={len(self._bootstrap)}, cached={len(self._keys)})"

    def forget(self) -> None:
        """Drop every cached lookup (after a revoke in this process)."""
        self._keys.clear()
        self._limits.clear()
        self._good.clear()

    def vouched(self, digest: bytes) -> bool:
        """Whether the key with this digest is known good in this process (no I/O)."""
        if digest in self._good:
            self._good.move_to_end(digest)
            return True
        return self._bootstrap_client(digest) is not None

    def _fresh(self, at: float) -> bool:
        return self._clock() - at < self.settings.key_cache_ttl_s

    def _bootstrap_client(self, digest: bytes) -> str | None:
        found = None
        for candidate, name in self._bootstrap:  # no early exit: constant time in the key
            if hmac.compare_digest(candidate, digest):
                found = name
        return found

    async def authenticate(
        self, sm: async_sessionmaker[AsyncSession], key: str
    ) -> Principal | None:
        if not key or len(key) > MAX_KEY_LEN:
            return None
        return await self.authenticate_digest(sm, key_digest(key))

    async def authenticate_digest(
        self, sm: async_sessionmaker[AsyncSession], digest: bytes
    ) -> Principal | None:
        """The caller whose key has this SHA-256 ``digest``, or None."""
        admins = self.settings.admin_client_names
        name = self._bootstrap_client(digest)
        if name is not None:
            return Principal(client=name, admin=name in admins, limits=await self.limits(sm, name))
        h = digest.hex()
        cached = self._keys.get(h)
        if cached is not None and self._fresh(cached[0]):
            self._keys.move_to_end(h)
            return cached[1]
        async with sm() as s:
            row = (
                await s.execute(
                    select(
                        ClientKey.client, ClientKey.admin, Client.rate_per_s, Client.max_in_flight
                    )
                    .join(Client, Client.name == ClientKey.client)
                    .where(ClientKey.key_hash == h, ClientKey.revoked_at.is_(None))
                )
            ).first()
        found = None
        if row is not None:
            client, admin, rate, cap = row
            limits = limits_for(self.settings, rate, cap)
            found = Principal(client=client, admin=bool(admin) or client in admins, limits=limits)
            self._limits[client] = (self._clock(), limits)
            _remember(self._good, digest, None)
        _remember(self._keys, h, (self._clock(), found))
        return found

    async def limits(self, sm: async_sessionmaker[AsyncSession], client: str) -> Limits:
        cached = self._limits.get(client)
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        async with sm() as s:
            row = (
                await s.execute(
                    select(Client.rate_per_s, Client.max_in_flight).where(Client.name == client)
                )
            ).first()
        limits = limits_for(self.settings, *(row or (None, None)))
        if len(self._limits) >= self.MAX_ENTRIES:  # one per client: clients are few
            self._limits.clear()
        self._limits[client] = (self._clock(), limits)
        return limits


def _remember(cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    """Put ``key`` in a bounded LRU (``Keyring.MAX_ENTRIES``), newest last."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > Keyring.MAX_ENTRIES:
        cache.popitem(last=False)
