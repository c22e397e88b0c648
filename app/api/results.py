"""Routes for what a task leaves behind: notifications, stored outputs, uploads, erasure.
Thin: parse, call ``app.notify`` / ``app.results`` / ``app.uploads``, present."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, Path, Query, Request, Response, UploadFile
from starlette.formparsers import MultiPartParser

from app import notify, results, uploads
from app.api.deps import principal
from app.api.tasks import PROBLEMS
from app.clients import Principal
from app.errors import InvalidRequest
from app.outbox import Services
from app.schemas import DeliveryList, DeliveryOut, Problem, UploadOut

router = APIRouter(prefix="/v1", responses={401: PROBLEMS[401], 429: PROBLEMS[429]})
files = APIRouter(tags=["uploads"])
Caller = Annotated[Principal, Depends(principal)]


async def get_services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


Svc = Annotated[Services, Depends(get_services)]
TaskId = str
# How much of an uploaded file is kept in memory before the rest goes to a temporary
# file. Starlette's default is 1 MiB per upload, so 32 uploads streaming at once
# (``GATEWAY_MAX_CONCURRENT_UPLOADS``) held up to 32 MiB before any was checked (bench
# P9); a photo is mostly over 1 MiB and went to disk anyway.
UPLOAD_SPOOL_BYTES = 64 * 1024


def limit_upload_spool() -> None:
    """Set ``UPLOAD_SPOOL_BYTES`` as the multipart parser's spool. Starlette has no
    per-request setting for it, only this class attribute: it holds for every multipart
    form the process parses (the upload route is the only one of the gateway's)."""
    MultiPartParser.spool_max_size = UPLOAD_SPOOL_BYTES


@router.get(
    "/tasks/{task_id}/deliveries",
    response_model=DeliveryList,
    tags=["notifications"],
    operation_id="listTaskDeliveries",
    summary="The task's notifications and attempts",
    responses={404: PROBLEMS[404], 422: PROBLEMS[422]},
)
async def list_deliveries(
    task_id: TaskId,
    caller: Caller,
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> DeliveryList:
    """Oldest first, each with every attempt (time, HTTP status, latency, the first KiB of
    the answer, the error). Keyset-paginated like history: ``limit`` (1-200, default 50),
    ``cursor`` from ``next_cursor`` (null on the last page)."""
    rows, next_cursor = await notify.list_deliveries(
        svc, task_id=task_id, client=caller.scope, limit=limit, cursor=cursor
    )
    return DeliveryList.model_validate(
        {"data": notify.presentable(rows), "next_cursor": next_cursor}
    )


@router.post(
    "/tasks/{task_id}/deliveries/redeliver",
    status_code=202,
    response_model=DeliveryOut,
    tags=["notifications"],
    operation_id="redeliverTaskNotification",
    summary="Send the task's terminal event again, as a new delivery",
    responses={
        404: PROBLEMS[404],
        409: {
            "model": Problem,
            "description": "The task is not finished, has no webhook_url, "
            "or an earlier redelivery is still pending",
        },
    },
)
async def redeliver(task_id: TaskId, caller: Caller, svc: Svc) -> DeliveryOut:
    """A new delivery (with its own ``webhook-id``) of the task as it is now, on the same
    retry schedule."""
    d = await notify.redeliver(svc, task_id=task_id, client=caller.scope)
    return DeliveryOut.model_validate(notify.presentable([(d, [])])[0])


@router.get(
    "/tasks/{task_id}/outputs/{index}",
    tags=["results"],
    operation_id="getTaskOutput",
    summary="The gateway's stored copy of one output",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "The image"},
        304: {"description": "Not modified (If-None-Match)"},
        404: {"model": Problem, "description": "Unknown task, or output not stored (yet)"},
        410: {"model": Problem, "description": "The task's images were erased"},
    },
)
async def get_output(
    task_id: TaskId,
    index: Annotated[int, Path(ge=0, le=1000)],
    request: Request,
    caller: Caller,
    svc: Svc,
) -> Response:
    """The image, with an ``ETag`` (its SHA-256; ``If-None-Match`` answers 304). Caches
    must revalidate, so an erased image is not served from one."""
    data, row = await results.open_output(svc, task_id=task_id, index=index, client=caller.scope)
    etag = f'"{row.sha256}"'
    cache = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=cache)
    return Response(
        data,
        media_type=row.content_type,
        headers={
            **cache,
            "Content-Disposition": f'inline; filename="{task_id}-{index}.'
            f'{"png" if row.content_type == "image/png" else "jpg"}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.delete(
    "/tasks/{task_id}/images",
    status_code=204,
    tags=["results"],
    operation_id="eraseTaskImages",
    summary="Erase the task's images here and at Wiro",
    responses={
        404: PROBLEMS[404],
        409: {"model": Problem, "description": "The task is not finished"},
    },
)
async def erase_images(task_id: TaskId, caller: Caller, svc: Svc) -> Response:
    """Deletes the stored outputs and the task's input if it was uploaded here, and asks
    Wiro to delete its copies (retried until it succeeds). The task stays, with
    ``images_erased_at``; its output URLs answer 410. Repeating it changes nothing."""
    await results.erase_task_images(svc, task_id=task_id, client=caller.scope)
    return Response(status_code=204)


@router.post(
    "/uploads",
    status_code=201,
    response_model=UploadOut,
    tags=["uploads"],
    operation_id="createUpload",
    summary="Upload a photo to use as inputImageUrl",
    responses={
        413: {"model": Problem, "description": "The file is too large"},
        415: {"model": Problem, "description": "Not a JPEG or PNG"},
        422: {
            "model": Problem,
            "description": "No file, or it does not decode, or too many pixels",
        },
        502: {"model": Problem, "description": "Wiro's File/Upload failed (upload mode wiro)"},
    },
)
async def create_upload(file: UploadFile, caller: Caller, svc: Svc) -> UploadOut:
    """Multipart, field ``file``: one JPEG or PNG. It is decoded to check it and re-encoded
    without its metadata (EXIF, XMP, IPTC, text chunks). The returned URL can be passed as
    ``inputImageUrl``."""
    limit = svc.ctx.settings.upload_max_bytes
    data = await file.read(limit + 1)
    if not isinstance(data, bytes):
        raise InvalidRequest(
            "The file field must be a file.", errors=[{"loc": ["file"], "msg": "not a file"}]
        )
    row = await uploads.create_upload(svc, client=caller.client, data=data)
    return UploadOut(
        url=row.url,
        content_type=row.content_type,  # type: ignore[arg-type]
        size=row.size,
        width=row.width,
        height=row.height,
    )


@files.get(
    "/files/{upload_id}/{name}",
    operation_id="getUploadedFile",
    summary="An uploaded photo, for Wiro to fetch (no auth: the URL is the secret)",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "The image"},
        404: {"model": Problem, "description": "Unknown or erased"},
    },
)
async def get_file(
    upload_id: Annotated[str, Path(max_length=64)],
    name: Annotated[str, Path(max_length=32)],
    svc: Svc,
) -> Response:
    data, row = await uploads.open_upload(svc, upload_id=upload_id, name=name)
    return Response(
        data,
        media_type=row.content_type,
        headers={
            "Cache-Control": "private, no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
