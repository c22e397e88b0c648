"""The gateway's error tree and its problem+json (RFC 9457) rendering.

```
GatewayError                  status, title, detail
├── NotFound                  404 unknown task (or another client's)
├── Conflict                  409 terminal task, concurrent idempotent request
├── Gone                      410 an erased task's images
├── Unauthorized              401 missing or unknown key
├── PayloadTooLarge           413
├── UnsupportedMediaType      415 an upload that is not a JPEG or PNG
├── InvalidRequest            422 (with ``errors``: [{"loc", "msg"}])
├── TooManyRequests           429 per-client rate limit (with ``Retry-After``)
└── BadGateway                502 the upstream failed a call made for the caller (uploads)
```
A database that cannot be reached (or a pooled connection that died with a restart) is a
503 with ``Retry-After``. Every handler answers ``application/problem+json``; unexpected
exceptions become a bare 500 with no detail, so no stack trace or secret can leave the
process.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


class GatewayError(Exception):
    status = 500
    title = "Internal Server Error"
    type = "about:blank"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors
        self.headers = headers


class NotFound(GatewayError):
    status, title = 404, "Not Found"


class Conflict(GatewayError):
    status, title = 409, "Conflict"


class Unauthorized(GatewayError):
    status, title = 401, "Unauthorized"


class PayloadTooLarge(GatewayError):
    status, title = 413, "Payload Too Large"


class InvalidRequest(GatewayError):
    status, title = 422, "Unprocessable Content"


class TooManyRequests(GatewayError):
    """The client's request rate is over its limit; ``Retry-After`` says when to retry."""

    status, title = 429, "Too Many Requests"


class Gone(GatewayError):
    status, title = 410, "Gone"


class UnsupportedMediaType(GatewayError):
    status, title = 415, "Unsupported Media Type"


class BadGateway(GatewayError):
    status, title = 502, "Bad Gateway"


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    errors: list[dict[str, Any]] | None = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail or title,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def database_problem(exc: DBAPIError) -> JSONResponse:
    """A dead connection (the database restarted: the pool does not pre-ping) or a
    database that cannot be reached or is locked: nothing was written, 503 and retry.
    Anything else from the database: a bare 500."""
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        log.warning("database unavailable: %s", type(exc.orig).__name__)
        return problem(
            503,
            "Service Unavailable",
            "The database is unavailable; retry.",
            headers={"Retry-After": "1"},
        )
    log.error("unhandled database error: %s", type(exc).__name__, exc_info=exc)
    return problem(500, "Internal Server Error", "An unexpected error occurred.")


def _clean_loc(loc: Any) -> list[str | int]:
    return [p for p in loc if p not in ("body",)] or list(loc)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        msg = str(e.get("msg", "invalid"))
        # pydantic's messages never echo secrets, but they may echo the input; keep them short.
        out.append({"loc": _clean_loc(e.get("loc", ())), "msg": msg[:300]})
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return problem(exc.status, exc.title, exc.detail, errors=exc.errors, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(
            422,
            "Unprocessable Content",
            "The request is not valid.",
            errors=_validation_errors(exc),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            404: "Not Found",
            405: "Method Not Allowed",
            401: "Unauthorized",
            413: "Payload Too Large",
            400: "Bad Request",
            414: "URI Too Long",
            429: "Too Many Requests",
            431: "Request Header Fields Too Large",
        }
        title = titles.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem(exc.status_code, title, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        return database_problem(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return problem(500, "Internal Server Error", "An unexpected error occurred.")


def problems_in_spec(app: FastAPI) -> None:
    """Make the OpenAPI spec say what the handlers do: error bodies are
    ``application/problem+json`` (FastAPI would write ``application/json``), and every
    operation has a ``default`` problem response for the errors any route may answer
    before it runs (400, 404, 405, 413, 414, 429, 431)."""
    generate = app.openapi
    ref = "#/components/schemas/Problem"
    # FastAPI documents its own 422 shape; the handler answers a problem there too.
    refs = (ref, "#/components/schemas/HTTPValidationError")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = generate()
        if ref.rsplit("/", 1)[1] not in spec.get("components", {}).get("schemas", {}):
            return spec
        for path in spec.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for response in responses.values():
                    content = response.get("content") or {}
                    body = content.get("application/json")
                    if body is not None and body.get("schema", {}).get("$ref") in refs:
                        response["content"] = {PROBLEM: {"schema": {"$ref": ref}}}
                responses.setdefault(
                    "default",
                    {
                        "description": "Any other error, as RFC 9457 problem details",
                        "content": {PROBLEM: {"schema": {"$ref": ref}}},
                    },
                )
        schemas = spec["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, now unused
            rest = {k: v for k, v in spec.items() if k != "components"}
            others = {n: d for n, d in schemas.items() if n != unused}
            if f"#/components/schemas/{unused}" not in json.dumps([rest, others]):
                schemas.pop(unused, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
