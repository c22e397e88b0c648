"""Leases: which process works on a row right now (tasks, deliveries, outputs, erasures).

A leased table has ``lease_owner`` and ``lease_until`` columns and a "due" timestamp
column. A row is *free* when ``lease_until`` is null or past; claiming sets both columns
in one statement::

    UPDATE t SET lease_owner = :owner, lease_until = :until
    WHERE key IN (SELECT key FROM t WHERE due <= :now AND free
                  ORDER BY due LIMIT :limit FOR UPDATE SKIP LOCKED)
      AND free
    RETURNING key

The outer ``free`` is the compare-and-set that makes the claim correct on both databases;
on PostgreSQL ``SKIP LOCKED`` also keeps replicas from queueing on one row. The holder
renews its leases (``renew``, the heartbeat, by key) while it works, gives one back when done
(``release``, usually folded into the statement that records the outcome: see
``FREE``/``held_by``), and all of them on a graceful shutdown (``release_all``); a
crashed holder's rows are free again once its leases run out, or at once when a process
that can tell the holder has ended (the same machine: app/owners.py) starts (``reclaim``).

Statements are built once per table (``Leases(...)``) and run with bind parameters
(``b_now``, ``b_until``, ``b_owner``, ``b_limit``, ``b_keys``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Column, ColumnElement, Row, Table, bindparam, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from app import owners
from app.db import ts
from app.prepared import run

# The values that give a lease back, for a statement that records an outcome and
# releases in one go.
FREE: dict[str, None] = {"lease_owner": None, "lease_until": None}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Leases:
    """The lease statements of one table, prebuilt.

    ``table``: a Core table (``Model.__table__``) with ``lease_owner``/``lease_until``;
    ``key``: its key column(s), what a claim returns (a value, or a tuple for several);
    ``due``: the timestamp column that says when a row wants work (due at ``<= now``),
    also the claim's order.
    """

    def __init__(self, table: Any, *, key: Sequence[str] | str, due: str) -> None:
        self.table = cast(Table, table)
        c = self.table.c
        names = [key] if isinstance(key, str) else list(key)
        self.key_columns: list[Column[Any]] = [c[n] for n in names]
        self.due_column: Column[Any] = c[due]
        self._composite = len(names) > 1
        self._claim = self.claim_statement(self.candidates())
        self._claim_keys = self.claim_statement(bindparam("b_keys", expanding=True))
        # By key: the key's index finds the rows (no index has ``lease_owner``: the
        # history would fill it, so a statement by owner alone reads the whole table).
        self._renew = (
            update(self.table)
            .where(
                c.lease_owner == bindparam("b_owner"),
                self._key().in_(bindparam("b_keys", expanding=True)),
            )
            .values(lease_until=ts("b_until"))
        )
        self._release = (
            update(self.table)
            .where(self.held_by(bindparam("b_owner")), *self._key_equals())
            .values(**FREE)
        )
        # Only rows that have a due time can be claimed, so only their leases matter;
        # the bound on it (any due time) lets the due column's index find them, where a
        # statement by ``lease_owner`` alone read the whole history. A lease left on a
        # row without one runs out as before (nobody can claim such a row meanwhile).
        any_due = self.due_column >= ts("b_epoch")
        self._release_all = (
            update(self.table).where(any_due, c.lease_owner == bindparam("b_owner")).values(**FREE)
        )
        self._holders = (
            select(c.lease_owner).where(any_due, c.lease_owner.like(bindparam("b_like"))).distinct()
        )
        self._release_of = (
            update(self.table)
            .where(any_due, c.lease_owner.in_(bindparam("b_owners", expanding=True)))
            .values(**FREE)
        )

    # ------------------------------------------------------------ building blocks

    def free(self) -> ColumnElement[bool]:
        """Nobody holds the row at ``b_now``."""
        c = self.table.c
        return or_(c.lease_until.is_(None), c.lease_until < ts("b_now"))

    def held_by(self, owner: Any) -> ColumnElement[bool]:
        """The row is leased by ``owner`` (a value or a bind parameter)."""
        return cast(ColumnElement[bool], self.table.c.lease_owner == owner)

    def _key(self) -> Any:
        return tuple_(*self.key_columns) if self._composite else self.key_columns[0]

    def _key_equals(self) -> list[ColumnElement[bool]]:
        return [col == bindparam(f"b_key{i}") for i, col in enumerate(self.key_columns)]

    def candidates(self) -> Select[Any]:
        """The default inner select: the ``b_limit`` free rows due longest, locked
        (skipping rows another transaction holds)."""
        return (
            select(*self.key_columns)
            .where(self.due_column <= ts("b_now"), self.free())
            .order_by(self.due_column)
            .limit(bindparam("b_limit"))
            .with_for_update(skip_locked=True)
        )

    def claim_statement(self, candidates: Any, returning: Sequence[Any] = ()) -> Any:
        """``UPDATE … WHERE key IN (candidates) AND free RETURNING key``. ``candidates``:
        a select of the key column(s) (binds ``b_now``, and whatever else it uses), or
        an expanding bind parameter of keys. ``returning``: what the claim returns
        instead of the key (a claimed row whole, say: its holder need not read it)."""
        return (
            update(self.table)
            .where(self._key().in_(candidates), self.free())
            .values(lease_owner=bindparam("b_owner"), lease_until=ts("b_until"))
            .returning(*(returning or self.key_columns))
        )

    def _keys(self, rows: Any) -> list[Any]:
        return [tuple(r) for r in rows] if self._composite else [r[0] for r in rows]

    # ------------------------------------------------------------ operations

    async def claim(
        self,
        conn: AsyncConnection,
        *,
        owner: str,
        now: datetime,
        until: datetime,
        limit: int,
        statement: Any = None,
        **params: Any,
    ) -> list[Any]:
        """Lease up to ``limit`` due, free rows to ``owner`` until ``until``; their keys.
        ``statement``: a prebuilt ``claim_statement`` over other candidates (its extra
        bind values in ``params``)."""
        rows = await run(
            conn,
            statement if statement is not None else self._claim,
            {"b_now": now, "b_until": until, "b_owner": owner, "b_limit": limit, **params},
        )
        return self._keys(rows)

    async def claim_rows(
        self,
        conn: AsyncConnection,
        statement: Any,
        *,
        owner: str,
        now: datetime,
        until: datetime,
        limit: int,
    ) -> Sequence[Row[Any]]:
        """``claim`` with a prebuilt ``claim_statement`` whose ``returning`` gives more
        than the keys: the claimed rows as it returns them."""
        res = await run(
            conn, statement, {"b_now": now, "b_until": until, "b_owner": owner, "b_limit": limit}
        )
        return res.all()

    async def claim_keys(
        self,
        conn: AsyncConnection,
        keys: Sequence[Any],
        *,
        owner: str,
        now: datetime,
        until: datetime,
    ) -> list[Any]:
        """Lease those of ``keys`` (picked by the caller) that are still free; their keys."""
        if not keys:
            return []
        rows = await run(
            conn,
            self._claim_keys,
            {"b_keys": list(keys), "b_now": now, "b_until": until, "b_owner": owner},
        )
        return self._keys(rows)

    async def renew(
        self, conn: AsyncConnection, keys: Sequence[Any], *, owner: str, until: datetime
    ) -> int:
        """Extend to ``until`` the leases of ``keys`` that ``owner`` still holds (the
        heartbeat; the others are left alone); how many."""
        if not keys:
            return 0
        res = await run(
            conn, self._renew, {"b_owner": owner, "b_until": until, "b_keys": list(keys)}
        )
        return int(res.rowcount or 0)

    async def release(self, conn: AsyncConnection, key: Any, *, owner: str) -> bool:
        """Give back one lease, if ``owner`` still holds it."""
        values = key if self._composite else (key,)
        res = await run(
            conn,
            self._release,
            {"b_owner": owner, **{f"b_key{i}": v for i, v in enumerate(values)}},
        )
        return bool(res.rowcount)

    async def release_all(self, conn: AsyncConnection, *, owner: str) -> int:
        """Give back every lease ``owner`` holds (graceful shutdown); how many."""
        res = await run(conn, self._release_all, {"b_owner": owner, "b_epoch": _EPOCH})
        return int(res.rowcount or 0)

    async def holders(self, conn: AsyncConnection, like: str) -> list[str]:
        """The holders of this table's leases whose names match ``like``."""
        got = await conn.scalars(self._holders, {"b_like": like, "b_epoch": _EPOCH})
        return list(got.all())

    async def release_of(self, conn: AsyncConnection, owners: Sequence[str]) -> int:
        """Give back every lease one of ``owners`` holds (holders known dead); how many."""
        if not owners:
            return 0
        res = await run(conn, self._release_of, {"b_owners": list(owners), "b_epoch": _EPOCH})
        return int(res.rowcount or 0)


async def reclaim(conn: AsyncConnection, tables: Sequence[Leases]) -> dict[str, int]:
    """Give back the leases of processes that ended on this machine (app/owners.py), so
    that their rows are free at once rather than when the leases run out; the leases
    given back, by table. Holders this process cannot judge are left alone."""
    like = owners.local_pattern()
    if like is None:
        return {}
    freed: dict[str, int] = {}
    for leases in tables:
        dead = [o for o in await leases.holders(conn, like) if owners.is_dead(o)]
        if dead:
            freed[leases.table.name] = await leases.release_of(conn, dead)
    return freed
