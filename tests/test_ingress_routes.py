"""The app's routes (app/main.py ``add_routes``) are the routes FastAPI's
``include_router`` would make, as the app's own: every attribute that decides how a
request is matched, solved, answered or documented is the same, in the same order."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, _IncludedRouter

from app.api import callbacks, health, results, stats, tasks
from app.api.direct import DirectRoute
from app.console import router as console_router
from app.main import create_app
from app.settings import Settings

ROUTERS = (
    tasks.router,
    callbacks.router,
    results.router,
    results.files,
    stats.router,
    health.router,
    console_router,
)
SAME = (
    "path path_format methods name endpoint status_code response_model response_class tags "
    "summary description response_description responses deprecated operation_id unique_id "
    "include_in_schema callbacks openapi_extra strict_content_type max_body_size "
    "stream_item_type is_sse_stream is_json_stream _embed_body_fields response_model_include "
    "response_model_exclude response_model_by_alias response_model_exclude_unset "
    "response_model_exclude_defaults response_model_exclude_none"
).split()


def _solved(d: Dependant) -> tuple[Any, ...]:
    """What FastAPI solves for a dependant, recursively."""
    return (
        d.call,
        d.name,
        d.scope,
        d.use_cache,
        [[p.name for p in ps] for ps in (d.path_params, d.query_params, d.header_params)],
        [[p.name for p in ps] for ps in (d.cookie_params, d.body_params)],
        (d.request_param_name, d.response_param_name, d.security_scopes_param_name),
        [_solved(s) for s in d.dependencies],
    )


def test_the_routes_are_those_include_router_makes() -> None:
    app = create_app(Settings())
    reference = FastAPI(dependencies=app.router.dependencies, redirect_slashes=False)
    for router in ROUTERS:
        reference.include_router(router)
    included = [
        c
        for r in reference.router.routes
        if isinstance(r, _IncludedRouter)
        for c in r.effective_route_contexts()
    ]
    own = [r for r in app.router.routes if isinstance(r, APIRoute)]
    assert len(own) == len(included) > 25
    for mine, theirs in zip(own, included, strict=True):
        assert type(mine) is type(theirs.original_route)
        for name in SAME:
            assert getattr(mine, name) == getattr(theirs, name), (mine.path, name)
        assert _solved(mine.dependant) == _solved(theirs.dependant), mine.path
        assert (mine.body_field is None) == (theirs.body_field is None)
        assert (mine.response_field is None) == (theirs.response_field is None)
        assert mine.dependency_overrides_provider is app
    assert not any(isinstance(r, _IncludedRouter) for r in app.router.routes)


def test_the_direct_callback_route_comes_first_and_names_the_declared_one() -> None:
    app = create_app(Settings())
    first = app.router.routes[0]
    assert isinstance(first, DirectRoute)
    assert first.declared.endpoint is callbacks.wiro_callback
    assert first.declared in app.router.routes
    assert app.url_path_for("wiro_callback", task_id="tsk_1", token="t") == (
        "/callbacks/wiro/tsk_1/t"
    )
    assert app.url_path_for("get_task", task_id="tsk_1") == "/v1/tasks/tsk_1"
