"""HTTP face of the simulator: Wiro's routes under ``/v1``, files, and ``/__sim`` control.

Routes only parse and hand over to ``Simulator`` (engine.py). Wiro routes accept JSON,
multipart or urlencoded bodies with the same fields and check auth first. A route Wiro
does not have (or Task/List when ``task_list_enabled`` is off) answers as Wiro does: HTTP
404 with code 0 "Error parsing url.".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from app.api.direct import DirectRoute, declared_route
from app.simulator.config import SimConfig
from app.simulator.engine import MAX_UPLOAD_BYTES, Simulator
from app.simulator.wire import WiroFail, normalize_fields, parsing_url
from app.tracing import NO_NATIVE_TELEMETRY

JSONBody = dict[str, Any]


def sim_of(request: Request) -> Simulator:
    sim: Simulator = request.app.state.sim
    return sim


async def get_sim(request: Request) -> Simulator:
    """``sim_of`` as a dependency (async: no thread pool hop)."""
    return sim_of(request)


async def wiro_auth(request: Request) -> Simulator:
    sim = sim_of(request)
    sim.check_auth(request.headers)
    return sim


async def read_fields(request: Request) -> dict[str, str]:
    """The request's fields from JSON, multipart or urlencoded (even if mislabelled)."""
    body = await request.body()  # cached, so form() below can re-read it
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            async with request.form() as form:  # closes the parts' temporary files
                return normalize_fields({k: v for k, v in form.multi_items() if isinstance(v, str)})
        except Exception:  # noqa: S110 - e.g. Wiro's own sample: a JSON body labelled multipart
            pass
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise WiroFail(0, "Request body is invalid.") from None
    if not isinstance(data, dict):
        raise WiroFail(0, "Request body is invalid.")
    return normalize_fields(data)


class BrokenResponse(Response):
    """Declares a body it never finishes: the server then drops the connection mid-body."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        partial = b'{"errors": [], "taskid": "'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": partial, "more_body": True})


wiro = APIRouter(prefix="/v1")


@wiro.post("/Run/{owner}/{model}")
async def run(
    owner: str, model: str, request: Request, sim: Simulator = Depends(wiro_auth)
) -> Response:
    outcome = await sim.run(owner, model, await read_fields(request))
    if outcome.drop_connection:
        return BrokenResponse()
    return JSONResponse(outcome.body)


@wiro.post("/Task/Detail")
async def task_detail(request: Request, sim: Simulator = Depends(wiro_auth)) -> JSONBody:
    return sim.detail(await read_fields(request))


# The routes every task life calls (Run, Detail, an output's download), answered in plain
# ASGI ahead of FastAPI's routing (``app.api.direct``): its request handling and
# dependency solving cost ~0.25 ms of the simulator's ~2.1 ms of CPU per task life, on
# the cores that the gateway under test shares (docs/benchmarks.md, forty-second round).
# Each calls its declared endpoint, so both ways answer alike.


async def _run_direct(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    sim = await wiro_auth(request)
    params = scope["path_params"]
    response = await run(params["owner"], params["model"], request, sim)
    await response(scope, receive, send)


async def _detail_direct(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    body = await task_detail(request, await wiro_auth(request))
    await JSONResponse(body)(scope, receive, send)


async def _cdn_direct(scope: Scope, receive: Receive, send: Send) -> None:
    params = scope["path_params"]
    sim = sim_of(Request(scope))
    response = await cdn_output(params["folder"], params["name"], sim)
    await response(scope, receive, send)


@wiro.post("/Task/Cancel")
async def task_cancel(request: Request, sim: Simulator = Depends(wiro_auth)) -> JSONBody:
    return sim.cancel(await read_fields(request))


@wiro.post("/Task/Kill")
async def task_kill(request: Request, sim: Simulator = Depends(wiro_auth)) -> JSONBody:
    return sim.kill(await read_fields(request))


@wiro.post("/Task/InputOutputDelete")
async def task_io_delete(request: Request, sim: Simulator = Depends(wiro_auth)) -> JSONBody:
    return sim.input_output_delete(await read_fields(request))


async def task_list_auth(request: Request) -> Simulator:
    """Task/List is undocumented: switched off, it is an unknown route (before auth)."""
    sim = sim_of(request)
    if not sim.config.task_list_enabled:
        raise parsing_url()
    sim.check_auth(request.headers)
    return sim


@wiro.post("/Task/List")
async def task_list(request: Request, sim: Simulator = Depends(task_list_auth)) -> JSONBody:
    return sim.list_tasks(await read_fields(request))


@wiro.post("/File/Upload")
async def file_upload(request: Request, sim: Simulator = Depends(wiro_auth)) -> JSONBody:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES + 64 * 1024:
        raise WiroFail(0, "File is too large (max 100 MB).", http_status=413)
    try:
        form = await request.form()
    except Exception:
        raise WiroFail(0, "Request parameter [file] required") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise WiroFail(0, "Request parameter [file] required")
        if file.size is not None and file.size > MAX_UPLOAD_BYTES:
            raise WiroFail(0, "File is too large (max 100 MB).", http_status=413)
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        ctype = file.content_type or "application/octet-stream"
    finally:
        await form.close()  # the parts' temporary files, however this ends
    return sim.upload(file.filename or "file", ctype, data)


public = APIRouter()


@public.get("/samples/portrait.jpg")
async def sample_portrait(sim: Simulator = Depends(get_sim)) -> Response:
    return Response(sim.sample_jpeg, media_type="image/jpeg")


@public.get("/cdn/{folder}/{name}")
async def cdn_output(folder: str, name: str, sim: Simulator = Depends(get_sim)) -> Response:
    output = sim.output_file(folder, name)
    if output is None:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return Response(output.data, media_type=output.contenttype)


@public.get("/files/{file_id}/{name}")
async def uploaded_file(file_id: str, name: str, sim: Simulator = Depends(get_sim)) -> Response:
    file = sim.uploaded_file(file_id, name)
    if file is None:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return Response(file.data, media_type=file.contenttype)


control = APIRouter(prefix="/__sim")


@control.get("/config")
async def get_config(sim: Simulator = Depends(get_sim)) -> JSONBody:
    return sim.config.public_view()


@control.patch("/config")
async def patch_config(request: Request, sim: Simulator = Depends(get_sim)) -> Response:
    try:
        patch = await request.json()
        if not isinstance(patch, dict):
            raise ValueError("expected a JSON object")
        config = sim.set_config(patch)
    except ValidationError as exc:
        errors = json.loads(exc.json(include_url=False, include_input=False))
        return JSONResponse({"detail": errors}, status_code=422)
    except ValueError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    return JSONResponse(config.public_view())


@control.post("/reset")
async def reset(sim: Simulator = Depends(get_sim)) -> JSONBody:
    await sim.reset()
    return {"ok": True}


@control.get("/stats")
async def stats(sim: Simulator = Depends(get_sim)) -> JSONBody:
    return sim.stats()


@control.get("/tasks")
async def task_records(
    gateway_task: str | None = None, sim: Simulator = Depends(get_sim)
) -> JSONBody:
    """Every task the simulator holds (``?gateway_task=tsk_...``: that gateway task's)."""
    return {"tasks": sim.task_records(gateway_task)}


@control.get("/tasks/{taskid}")
async def task_record(taskid: str, sim: Simulator = Depends(get_sim)) -> Response:
    record = sim.task_record(taskid)
    if record is None:
        return JSONResponse({"detail": "unknown task"}, status_code=404)
    return JSONResponse(record)


async def _wiro_fail(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WiroFail)
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (and wrong methods) outside ``/__sim``: Wiro's "Error parsing url."."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405) and not request.url.path.startswith("/__sim"):
        return await _wiro_fail(request, parsing_url())
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_sim_app(
    config: SimConfig | None = None, *, http_client: httpx.AsyncClient | None = None
) -> FastAPI:
    """The simulator as an ASGI app. ``http_client`` (optional) carries callbacks and
    input downloads; by default the app makes its own and closes it on shutdown."""
    sim = Simulator(config if config is not None else SimConfig.from_env(), http_client=http_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await sim.aclose()

    app = FastAPI(
        title="Wiro simulator",
        version="1",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,  # as the gateway's (app/tracing.py)
    )
    app.state.sim = sim
    app.add_exception_handler(WiroFail, _wiro_fail)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(wiro)
    app.include_router(public)
    app.include_router(control)
    for endpoint, method, handler in (
        (run, "POST", _run_direct),
        (task_detail, "POST", _detail_direct),
        (cdn_output, "GET", _cdn_direct),
    ):
        declared = declared_route([*wiro.routes, *public.routes], endpoint)
        app.router.routes.insert(0, DirectRoute(declared, method, handler))
    return app
