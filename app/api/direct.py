"""A declared route's hot method answered in plain ASGI, ahead of FastAPI's routing.

``DirectRoute`` sits first in the app's routes. For its one method it matches the path as
the declared ``APIRoute`` does (the same pattern and convertors) and puts the same route,
endpoint and path parameters in the scope, then calls an ASGI function instead of
FastAPI's request handler: no ``Request`` wrapper, dependency solving or response model
(about half the CPU of a Wiro callback). Everything else is as before: the declared route
stays in the app (the OpenAPI spec, ``url_path_for``, other methods' 405), the routes and
the edge layer around it are the same, and what the function raises reaches the same
exception handlers (``app.errors``). The function and the declared endpoint share their
work (``app.api.callbacks``, ``app.api.submit_direct``); ``tests/test_ingress_callbacks.py``
and ``tests/test_ingress_submit.py`` compare the answers.

``accepts`` (optional) declines a request from its head: the route does not match it and
FastAPI's declared route answers it as before (e.g. a body type the function does not
parse).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
Accepts = Callable[[Scope], bool]


class DirectRoute(BaseRoute):
    def __init__(
        self, declared: APIRoute, method: str, handler: Handler, accepts: Accepts | None = None
    ) -> None:
        if method not in (declared.methods or ()):
            raise ValueError(f"{declared.path} does not take {method}")
        self.declared = declared
        self.method = method
        self.handler = handler
        self.accepts = accepts
        self.path_format = declared.path_format  # what routing records as the route

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != self.method:
            return Match.NONE, {}  # the declared route answers (405 for other methods)
        found = self.declared.path_regex.match(get_route_path(scope))
        if found is None or (self.accepts is not None and not self.accepts(scope)):
            return Match.NONE, {}  # declined: the declared route answers
        convertors = self.declared.param_convertors
        path_params = dict(scope.get("path_params", {}))
        for key, value in found.groupdict().items():
            path_params[key] = convertors[key].convert(value)
        return Match.FULL, {
            "endpoint": self.declared.endpoint,
            "path_params": path_params,
            "route": self.declared,
        }

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        return self.declared.url_path_for(name, **path_params)


def declared_route(routes: list[BaseRoute], endpoint: Callable[..., Any]) -> APIRoute:
    """The app's route for ``endpoint``."""
    for route in routes:
        if isinstance(route, APIRoute) and route.endpoint is endpoint:
            return route
    raise LookupError(f"no route for {endpoint.__qualname__}")
