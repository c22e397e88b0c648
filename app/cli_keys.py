"""``headshot-gateway keys create|rotate|list|revoke|limits``: client keys in the database.

``create`` and ``rotate`` print the new key alone on stdout (so it can be piped into a
secret store) and what it is on stderr; the key is not stored and is never shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import clients
from app.clients import ClientKeyError, KeyInfo

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*$")


def parse_rate(text: str) -> float:
    """``10/s``, ``10``, ``600/min`` → requests per second (0 = no limit)."""
    m = _RATE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (use e.g. 10/s or 600/min)")
    value = float(m.group(1))
    return value / 60 if (m.group(2) or "s").startswith("m") else value


def _run(work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[int]]) -> int:
    from app.db import make_engine, make_sessionmaker
    from app.settings import Settings

    async def go() -> int:
        engine = make_engine(Settings().effective_database_url)
        try:
            return await work(make_sessionmaker(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except ClientKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DBAPIError as e:
        print(
            f"error: the database is unreachable or not migrated "
            f"(run `headshot-gateway migrate`): {type(e.orig).__name__}",
            file=sys.stderr,
        )
        return 1


def _describe(key: str, info: KeyInfo, verb: str) -> int:
    print(key, flush=True)
    print(
        f"{verb} a key for client {info.client!r}: prefix {info.prefix}, "
        f"{'admin' if info.admin else 'not admin'}. It is shown only this once: "
        f"store it now.",
        file=sys.stderr,
    )
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    async def work(sm: async_sessionmaker[AsyncSession]) -> int:
        key, info = await clients.create_key(
            sm,
            client=args.name,
            admin=args.admin,
            rate_per_s=args.rate,
            max_in_flight=args.max_in_flight,
        )
        return _describe(key, info, "created")

    return _run(work)


def cmd_rotate(args: argparse.Namespace) -> int:
    async def work(sm: async_sessionmaker[AsyncSession]) -> int:
        key, info = await clients.rotate_key(sm, client=args.name)
        _describe(key, info, "rotated: added")
        print(
            f"Both keys work now. Once callers use the new one, run `headshot-gateway keys "
            f"revoke {info.client} --key-prefix OLD_PREFIX`.",
            file=sys.stderr,
        )
        return 0

    return _run(work)


def cmd_revoke(args: argparse.Namespace) -> int:
    async def work(sm: async_sessionmaker[AsyncSession]) -> int:
        from app.settings import Settings

        done = await clients.revoke_keys(sm, client=args.name, prefix=args.key_prefix)
        ttl = Settings().key_cache_ttl_s
        print(
            f"revoked {len(done)} key(s) of {args.name!r}: {', '.join(done)}. Running "
            f"gateways stop accepting them within {ttl:g}s (GATEWAY_KEY_CACHE_TTL_S)."
        )
        return 0

    return _run(work)


def cmd_limits(args: argparse.Namespace) -> int:
    async def work(sm: async_sessionmaker[AsyncSession]) -> int:
        await clients.set_limits(
            sm, client=args.name, rate_per_s=args.rate, max_in_flight=args.max_in_flight
        )
        print(f"limits of {args.name!r} updated")
        return 0

    return _run(work)


def _fmt_limit(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "default"
    return "none" if value == 0 else f"{value:g}{unit}"


def cmd_list(args: argparse.Namespace) -> int:
    from app.settings import Settings

    settings = Settings()

    async def work(sm: async_sessionmaker[AsyncSession]) -> int:
        rows: list[dict[str, Any]] = [
            {
                "client": k.client,
                "prefix": k.prefix,
                "admin": k.admin or k.client in settings.admin_client_names,
                "source": "database",
                "rate_per_s": k.rate_per_s,
                "max_in_flight": k.max_in_flight,
                "created_at": k.created_at.isoformat().replace("+00:00", "Z"),
                "revoked_at": k.revoked_at.isoformat().replace("+00:00", "Z")
                if k.revoked_at
                else None,
            }
            for k in await clients.list_keys(sm)
        ]
        limits = await clients.stored_limits(sm)
        for name in sorted(set(settings.client_keys.values())):
            rate, cap = limits.get(name, (None, None))
            rows.append(
                {
                    "client": name,
                    "prefix": None,
                    "admin": name in settings.admin_client_names,
                    "source": "GATEWAY_API_KEYS",
                    "rate_per_s": rate,
                    "max_in_flight": cap,
                    "created_at": None,
                    "revoked_at": None,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        head = ("CLIENT", "PREFIX", "ADMIN", "RATE", "MAX_IN_FLIGHT", "CREATED", "REVOKED")
        table = [head] + [
            (
                r["client"],
                r["prefix"] or "(bootstrap)",
                "yes" if r["admin"] else "no",
                _fmt_limit(r["rate_per_s"], "/s"),
                _fmt_limit(r["max_in_flight"]),
                r["created_at"] or "-",
                r["revoked_at"] or "-",
            )
            for r in rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        rate = settings.default_client_rate_per_s
        print(
            f"defaults: rate {_fmt_limit(rate, '/s')}, max in flight "
            f"{_fmt_limit(settings.client_max_in_flight)} (GATEWAY_CLIENT_RATE_PER_S, "
            f"GATEWAY_CLIENT_MAX_IN_FLIGHT)",
            file=sys.stderr,
        )
        return 0

    return _run(work)


def add_parser(sub: Any) -> None:
    """Register ``keys`` and its subcommands on the console script's subparsers."""
    keys = sub.add_parser("keys", help="client API keys: create, rotate, list, revoke, limits")
    ks = keys.add_subparsers(dest="keys_command", required=True)

    def limit_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--rate",
            type=parse_rate,
            default=None,
            help="request rate limit, e.g. 10/s or 600/min (0 = none)",
        )
        p.add_argument(
            "--max-in-flight",
            type=int,
            default=None,
            help="tasks queued or running upstream at once (0 = no cap)",
        )

    p = ks.add_parser(
        "create", help="a new key (a second one for an existing client); printed once"
    )
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see every client's tasks")
    limit_flags(p)
    p.set_defaults(func=cmd_create)
    p = ks.add_parser("rotate", help="a second key with the current key's scope")
    p.add_argument("name")
    p.set_defaults(func=cmd_rotate)
    p = ks.add_parser("list", help="clients and keys (prefixes only, never the keys)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = ks.add_parser("revoke", help="revoke all of a client's keys, or one by prefix")
    p.add_argument("name")
    p.add_argument("--key-prefix", default=None)
    p.set_defaults(func=cmd_revoke)
    p = ks.add_parser("limits", help="change a client's limits")
    p.add_argument("name")
    limit_flags(p)
    p.set_defaults(func=cmd_limits)
