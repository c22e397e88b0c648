"""``POST /v1/tasks`` in plain ASGI, ahead of FastAPI's routing (``app.api.direct``).

The submit's answer is the same as the declared route's (``app.api.tasks.create_task``),
made with FastAPI's own pieces where they decide something: the body read and parsed as
``fastapi.routing.get_request_handler`` does for a JSON content type, the app's
dependencies and the caller (``deps.principal``) in FastAPI's order, the parameters'
validation errors from FastAPI's functions (``request_params_to_args``,
``request_body_to_args``) raised as the same ``RequestValidationError`` the app's handler
renders, the work itself (``tasks.submit_task``), and the result serialized by the
route's response field (``serialize_response``: same bytes). What it skips is the
machinery around them: the request handler's wrappers and exit stacks, dependency
solving, the per-request ``Request``/``Response`` plumbing.

Declined (FastAPI answers, as before): a request whose ``Content-Type`` is not
``application/json`` (with or without parameters): none at all, ``+json`` types, forms
and multipart, anything the route would not parse as JSON or that this module would have
to re-read; and any request while FastAPI's own telemetry is on (it records what this
path skips). ``tests/test_ingress_submit.py`` compares both paths' answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import params
from fastapi._compat import Undefined
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, serialize_response
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.deps import log_task_id, principal
from app.api.direct import Handler
from app.api.tasks import submit_task

HEADERS = ("prefer", "idempotency_key")  # the route's header parameters, in order
KEY_MAX = 255  # the Idempotency-Key's max_length


def accepts(scope: Scope) -> bool:
    """Whether this module answers the request: a JSON content type (read as
    ``email.message`` reads it, for the one type it takes) and no FastAPI telemetry."""
    if scope.get("fastapi.telemetry") is not None:
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":  # the first one, as ``Headers.get`` takes it
            return bool(value.split(b";", 1)[0].strip().lower() == b"application/json")
    return False


def plainly_valid(key: str) -> bool:
    """An Idempotency-Key that FastAPI's check (``max_length=255``, ``pattern=r"\\S"``)
    surely passes: short enough, with a printable ASCII character. Any other value is
    checked by FastAPI's own function, for the same value or the same errors."""
    return len(key) <= KEY_MAX and any("!" <= c <= "~" for c in key)


def handler(route: APIRoute, app_dependencies: Sequence[Callable[..., Any]]) -> Handler:
    """The ASGI function answering ``route`` (``create_task``). Checks, once, that the
    route is still the shape this module answers for: one JSON body, the two headers,
    the app's dependencies then the caller, the default response class."""
    dependant = route.dependant
    body_field = route.body_field
    response_field = route.response_field
    calls = [d.call for d in dependant.dependencies]
    if (
        body_field is None
        or isinstance(body_field.field_info, params.Form)
        or dependant.body_params != [body_field]
        or route._embed_body_fields
        or tuple(f.name for f in dependant.header_params) != HEADERS
        or dependant.path_params
        or dependant.query_params
        or dependant.cookie_params
        or calls != [*app_dependencies, principal]
        or any(d.dependencies or d.body_params for d in dependant.dependencies[:-1])
        or route.max_body_size is not None
        or not isinstance(route.response_class, DefaultPlaceholder)
        or response_field is None
        or route.status_code is None
    ):
        raise TypeError(f"{route.path}: not the route app.api.submit_direct answers for")
    header_params = dependant.header_params
    body_params = dependant.body_params
    status_code = route.status_code

    async def direct(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        # The body, as FastAPI reads it for a JSON content type (``get_request_handler``).
        try:
            raw = await request.body()
            body: Any = json.loads(raw) if raw else Undefined
        except json.JSONDecodeError as e:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", e.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": e.msg},
                    }
                ],
                body=e.doc,
            ) from e
        except HTTPException:  # the edge's ``BodyTooLarge``
            raise
        except Exception as e:  # a client gone mid-body, undecodable bytes, ...
            raise HTTPException(
                status_code=400, detail="There was an error parsing the body"
            ) from e
        # The dependencies, in FastAPI's order: the app's, the caller, the parameters.
        log_task_id(scope["path_params"])
        caller = await principal(request)
        key = request.headers.get("idempotency-key")
        errors: list[Any] = []
        if key is not None and not plainly_valid(key):
            values, errors = request_params_to_args(header_params, request.headers)
            key = values.get("idempotency_key")
        values, body_errors = await request_body_to_args(body_params, body, False)
        errors.extend(body_errors)
        if errors:
            raise RequestValidationError(errors, body=None if body is Undefined else body)

        # The endpoint, and its answer as FastAPI makes it from the return value and the
        # ``Response`` parameter (``_build_response_args``; no background tasks).
        sub = Response()
        del sub.headers["content-length"]
        sub.status_code = None  # type: ignore[assignment]
        out = await submit_task(request, sub, caller, values[body_field.name], key)
        content = await serialize_response(
            field=response_field,
            response_content=out,
            include=route.response_model_include,
            exclude=route.response_model_exclude,
            by_alias=route.response_model_by_alias,
            exclude_unset=route.response_model_exclude_unset,
            exclude_defaults=route.response_model_exclude_defaults,
            exclude_none=route.response_model_exclude_none,
            is_coroutine=True,
            dump_json=True,
        )
        response = Response(
            content=content,
            media_type="application/json",
            status_code=sub.status_code or status_code,
        )
        response.headers.raw.extend(sub.headers.raw)
        await response(scope, receive, send)

    return direct
