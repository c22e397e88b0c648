"""The committed spec is what the app serves."""

from __future__ import annotations

import json
from pathlib import Path

from app.main import create_app
from app.settings import Settings

SPEC = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_committed_spec_matches_the_app() -> None:
    served = create_app(Settings()).openapi()
    committed = json.loads(SPEC.read_text())
    assert committed == served, "openapi/openapi.json is stale: run `make openapi`"


def test_operation_ids_are_stable_and_unique() -> None:
    spec = create_app(Settings()).openapi()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert {
        "createTask",
        "getTask",
        "listTasks",
        "listTaskEvents",
        "cancelTask",
        "wiroCallback",
        "healthz",
        "readyz",
    } <= set(ids)


def test_spec_holds_no_secret_defaults() -> None:
    text = SPEC.read_text().lower()
    for word in ("x-api-key", "x-signature", "whsec_", "socketaccesstoken"):
        assert word not in text
