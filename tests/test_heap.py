"""The heap a ``serve`` or ``simulate`` process has once it has started is frozen
(``app.cli._Server``, ``gc.freeze``): a full collection under load then walks only what
was made since, not every module, route and schema of the app (a 159 ms pause of the
event loop without it: docs/benchmarks.md, "forty-fourth round").

The server runs in this process, so each test gives the frozen objects back to the
collector (``gc.unfreeze``) when it ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.cli import _Server
from app.main import create_app
from app.settings import Settings
from tests.procs import free_port, serving


class Node:
    """A container the collector tracks, for cycles made after the start."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
async def test_a_started_server_freezes_what_it_holds(tmp_path: Path) -> None:
    settings = Settings(
        env="test", database_url=f"sqlite+aiosqlite:///{tmp_path}/heap.db", data_dir=str(tmp_path)
    )
    app = create_app(settings, start_workers=False)
    # Held here, so none of them is freed before the start. A collection may still
    # untrack some (a tuple or dict of atomic values only): those are not counted.
    before = gc.get_objects()
    assert gc.get_freeze_count() == 0
    async with serving(app, free_port(), server_class=_Server):
        # Everything the collector tracked before the start (the app among it) and what
        # the lifespan made is frozen; nothing of it is walked by a collection now.
        still = {id(o) for o in before if gc.is_tracked(o)}
        assert id(app) in still
        assert gc.get_freeze_count() >= len(still)
        assert not still.intersection(id(o) for o in gc.get_objects())
        # Garbage made after the start is still the collector's: a cycle is freed.
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2


@pytest.mark.usefixtures("unfrozen")
async def test_a_server_that_does_not_start_freezes_nothing() -> None:
    async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no start")

    config = uvicorn.Config(
        refuse, host="127.0.0.1", port=free_port(), log_level="critical", lifespan="on"
    )
    server = _Server(config)
    with pytest.raises(SystemExit):
        await server.serve()
    assert not server.started
    assert gc.get_freeze_count() == 0
