"""Alembic environment, async. The URL comes from the gateway's settings unless the
caller put one in the config (tests and ``headshot-gateway migrate`` do)."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app import models  # noqa: F401 - registers the tables
from app.db import Base, make_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
MIGRATION_LOCK_KEY = 0x48475720  # "HGW ", any constant shared by every replica


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.settings import Settings

    return Settings().effective_database_url


# Indexes that exist on one database only (declared in migrations, not in the models):
# the GIN index of 0002, on PostgreSQL from 0002 to 0021 (0022 drops it).
DIALECT_ONLY_INDEXES = {"ix_tasks_metadata_gin"}


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "index" and name in DIALECT_ONLY_INDEXES)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def _do_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = make_engine(_url())
    try:
        async with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                # Every replica may run migrations at start-up: one at a time. The
                # session-level lock is released when this connection closes, even if
                # the process dies.
                await connection.execute(
                    text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
                )
                await connection.commit()
            await connection.run_sync(_do_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _do_run(connection)
        return
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
