"""Alembic, driven from code: ``headshot-gateway migrate``, tests and readiness."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def _root() -> Path:
    """Where ``alembic.ini`` and ``migrations/`` are: the checkout this package sits in,
    else the working directory. An installed package (the Docker image) has no migrations
    beside it; the image copies them to its WORKDIR."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "migrations").is_dir() else Path.cwd()


ROOT = _root()


def alembic_config(database_url: str) -> Config:
    ini = ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    return cfg


def head_revisions() -> frozenset[str]:
    """Every head (branches are allowed while features land; ``upgrade`` applies all)."""
    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def known_revisions() -> frozenset[str]:
    """Every revision this version of the code ships."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(rev.revision for rev in script.walk_revisions())


@contextmanager
def _sqlite_file_lock(database_url: str) -> Iterator[None]:
    """Serialise migrations of one SQLite file across processes (PostgreSQL uses an
    advisory lock inside migrations/env.py)."""
    path = database_url.split("///", 1)[-1] if database_url.startswith("sqlite") else ""
    if not path or path == ":memory:":
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.migrate.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(database_url: str, revision: str = "heads") -> None:
    """Bring the database to ``revision``; safe to run from several processes at once.
    Runs its own event loop: call from sync code."""
    with _sqlite_file_lock(database_url):
        command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    with _sqlite_file_lock(database_url):
        command.downgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Fail if the models and the newest migration disagree (``alembic check``)."""
    command.check(alembic_config(database_url))
