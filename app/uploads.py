"""Uploads: a caller's own photo turned into a URL that can be passed as ``inputImageUrl``.

The file must be a JPEG or PNG (by its bytes, not its declared type) within
``GATEWAY_UPLOAD_MAX_BYTES`` and ``GATEWAY_IMAGE_MAX_PIXELS``, and must decode whole. It
is then re-encoded (``imaging.clean``), which drops EXIF (GPS position, camera serial…),
XMP, IPTC, text chunks and the ICC profile (the pixels converted to sRGB first), so none
of that reaches Wiro or lingers here. Nothing is
stored and no row is written unless every check passes.

``GATEWAY_UPLOAD_MODE``: ``local`` keeps the file in the store and serves it without auth
(Wiro must fetch it) at ``{GATEWAY_PUBLIC_URL}/files/{32 random characters}/input.jpg``;
``wiro`` forwards it to Wiro's ``File/Upload`` and returns Wiro's URL. Either way the
upload is recorded with its client so that erasure can find it.
"""

from __future__ import annotations

import secrets

from sqlalchemy.exc import SQLAlchemyError

from app import imaging
from app.db import unit_of_work
from app.errors import BadGateway, InvalidRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from app.ids import sha256_hex
from app.models import Upload
from app.outbox import Services
from app.wiro import WiroError


def upload_key(upload_id: str, name: str) -> str:
    return f"uploads/{upload_id}/{name}"


async def create_upload(svc: Services, *, client: str, data: bytes) -> Upload:
    ctx, s = svc.ctx, svc.ctx.settings
    if len(data) > s.upload_max_bytes:
        raise PayloadTooLarge(
            f"The file is {len(data)} bytes, over the limit of {s.upload_max_bytes} bytes."
        )
    if not data:
        raise InvalidRequest("The file is empty.", errors=[{"loc": ["file"], "msg": "empty"}])
    try:
        cleaned, info = await imaging.in_thread(
            imaging.clean,
            data,
            max_pixels=s.image_max_pixels,
            concurrency=s.image_decode_concurrency,
        )
    except imaging.ImageRejected as e:
        if e.kind == "type":
            raise UnsupportedMediaType(
                f"The file must be a JPEG or PNG image: {e.message}."
            ) from None
        raise InvalidRequest(
            f"The file is not a usable image: {e.message}.",
            errors=[{"loc": ["file"], "msg": e.message}],
        ) from None
    upload_id = secrets.token_urlsafe(24)
    name = f"input.{imaging.EXTENSIONS[info.content_type]}"
    key: str | None = None
    if s.upload_mode == "local":
        key = upload_key(upload_id, name)
        url = f"{s.public_url}/files/{upload_id}/{name}"
        await svc.store.put(key, cleaned)
    else:
        try:
            url = await ctx.wiro.upload(
                filename=name, content=cleaned, content_type=info.content_type
            )
        except WiroError as e:
            raise BadGateway(f"Wiro's File/Upload failed: {str(e)[:300]}") from None
    row = Upload(
        id=upload_id,
        client=client,
        mode=s.upload_mode,
        url=url,
        url_hash=sha256_hex(url),
        storage_key=key,
        content_type=info.content_type,
        size=info.size,
        sha256=info.sha256,
        width=info.width,
        height=info.height,
        created_at=ctx.clock(),
    )
    try:
        async with unit_of_work(ctx.sm) as ses:
            ses.add(row)
    except SQLAlchemyError:
        if key is not None:
            await svc.store.delete(key)
        raise
    return row


async def open_upload(svc: Services, *, upload_id: str, name: str) -> tuple[bytes, Upload]:
    """A local upload's bytes, for Wiro (no auth: the random id is the capability)."""
    if len(upload_id) > 64 or len(name) > 32:
        raise NotFound("No such file.")
    async with svc.ctx.sm() as s:
        row = await s.get(Upload, upload_id)
    if (
        row is None
        or row.mode != "local"
        or row.erased_at is not None
        or not row.storage_key
        or row.storage_key != upload_key(upload_id, name)
    ):
        raise NotFound("No such file.")
    data = await svc.store.get(row.storage_key)
    if data is None:
        raise NotFound("No such file.")
    return data, row
