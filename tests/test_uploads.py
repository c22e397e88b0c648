"""Uploads: one JPEG or PNG, checked by decoding it, cleaned of its metadata, served at an
unguessable URL (or forwarded to Wiro); anything else is a clear 4xx and leaves nothing
behind."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from sqlalchemy import func, select

from app import imaging
from app.models import Upload
from app.settings import Settings
from tests.conftest import Gateway, Sim, run_gateway

PROBLEM = "application/problem+json"


def jpeg_with_metadata() -> bytes:
    """60x40 pixels, EXIF orientation 6 (shown rotated: 40x60), camera and owner in EXIF,
    and a comment."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    exif[0x010F] = "SpyCam Industries"  # Make
    exif[0x013B] = "Jane Doe"  # Artist
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (10, 200, 30)).save(buf, "JPEG", exif=exif, comment=b"secret note")
    return buf.getvalue()


def png_with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")
    info.add_text("Location", "52.52N 13.40E")
    buf = io.BytesIO()
    Image.new("RGBA", (32, 24), (1, 2, 3, 255)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 megapixels) in ~50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" * (1 + (side + 7) // 8)
    co = zlib.compressobj(9)
    data = b"".join(co.compress(row) for _ in range(side)) + co.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


async def upload(
    gw: Gateway,
    data: bytes,
    *,
    name: str = "me.jpg",
    ctype: str = "image/jpeg",
    client: str = "alpha",
) -> httpx.Response:
    return await gw.client(client).post("/v1/uploads", files={"file": (name, data, ctype)})


async def upload_rows(gw: Gateway) -> int:
    async with gw.ctx.sm() as s:
        return int(await s.scalar(select(func.count()).select_from(Upload)) or 0)


def stored_files(root: Path) -> list[Path]:
    folder = root / "uploads"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


async def test_upload_is_cleaned_and_served(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        original = jpeg_with_metadata()
        r = await upload(gw, original)
        assert r.status_code == 201, r.text
        body = r.json()
        assert re.fullmatch(
            rf"{re.escape(gw.url)}/files/[A-Za-z0-9_-]{{32}}/input\.jpg", body["url"]
        ), body
        assert (body["content_type"], body["width"], body["height"]) == ("image/jpeg", 40, 60)
        async with httpx.AsyncClient() as anon:  # Wiro fetches it without credentials
            got = await anon.get(body["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert len(got.content) == body["size"]
        for secret in (b"SpyCam", b"Jane Doe", b"secret note", b"Exif"):
            assert secret in original and secret not in got.content
        im = Image.open(io.BytesIO(got.content))
        assert im.size == (40, 60)  # orientation applied to the pixels, then dropped
        assert not im.getexif() and "comment" not in im.info

        r = await upload(gw, png_with_text(), name="x.png", ctype="image/png")
        assert r.status_code == 201, r.text
        assert r.json()["url"].endswith("/input.png")
        async with httpx.AsyncClient() as anon:
            png = (await anon.get(r.json()["url"])).content
        assert b"Jane Doe" not in png and b"52.52N" not in png
        assert Image.open(io.BytesIO(png)).size == (32, 24)

        async with gw.ctx.sm() as s:
            rows = (await s.scalars(select(Upload).order_by(Upload.created_at))).all()
        assert [(u.client, u.mode, u.content_type) for u in rows] == [
            ("alpha", "local", "image/jpeg"),
            ("alpha", "local", "image/png"),
        ]
        assert len(stored_files(tmp_path)) == 2
        # a wrong name or id is simply not there
        async with httpx.AsyncClient() as anon:
            wrong_name = body["url"].replace("input.jpg", "input.png")
            assert (await anon.get(wrong_name)).status_code == 404
            assert (await anon.get(f"{gw.url}/files/{'A' * 32}/input.jpg")).status_code == 404


async def test_bad_uploads_are_refused_and_leave_nothing(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, upload_max_bytes=200_000
    ) as gw:
        cases = [
            (b"hello, I am a text file", "notes.txt", "text/plain", 415, "not one"),
            (gif(), "anim.gif", "image/gif", 415, "GIF"),
            (b"\xff\xd8\xff\xe0" + b"\x00" * 500, "fake.jpg", "image/jpeg", 422, "decoded"),
            (jpeg_with_metadata()[:300], "cut.jpg", "image/jpeg", 422, "decoded"),
            (png_bomb(), "bomb.png", "image/png", 422, "pixels"),
            (b"\xff\xd8\xff" + b"\x00" * 210_000, "big.jpg", "image/jpeg", 413, "bytes"),
            (b"\xff\xd8\xff" + b"\x00" * 400_000, "bigger.jpg", "image/jpeg", 413, "bytes"),
        ]
        for data, name, ctype, status, words in cases:
            r = await upload(gw, data, name=name, ctype=ctype)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.headers["content-type"].startswith(PROBLEM), name
            assert words in r.json()["detail"], (name, r.json())
        r = await gw.client().post("/v1/uploads", data={"notfile": "x"})
        assert r.status_code == 422 and ["file"] in [e["loc"] for e in r.json()["errors"]]
        async with httpx.AsyncClient(base_url=gw.url) as anon:
            r = await anon.post("/v1/uploads", files={"file": ("a.png", png_with_text())})
            assert r.status_code == 401
        assert await upload_rows(gw) == 0
        assert stored_files(tmp_path) == []


async def test_wiro_mode_forwards_to_file_upload(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, upload_mode="wiro") as gw:
        r = await upload(gw, jpeg_with_metadata())
        assert r.status_code == 201, r.text
        url = r.json()["url"]
        assert url.startswith(f"{sim.url}/files/")
        assert sim.stats()["upload_calls"] == 1
        forwarded = httpx.get(url).content
        assert b"SpyCam" not in forwarded and Image.open(io.BytesIO(forwarded)).size == (40, 60)
        async with gw.ctx.sm() as s:
            [row] = (await s.scalars(select(Upload))).all()
        assert (row.mode, row.url, row.storage_key, row.client) == ("wiro", url, None, "alpha")
        assert stored_files(tmp_path) == []


def png_of(side: int) -> bytes:
    """A real side x side PNG, 1-bit, a few hundred KB at most (it compresses to nothing)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


HOSTILE_ICC = b"\x00\x00\x02\x00<script>alert(document.domain)</script>" + b"\x00" * 400


async def test_the_pixel_cap_is_sized_for_portraits(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """Under the default GATEWAY_IMAGE_MAX_PIXELS (40 MP), a 7000x7000 PNG (49 MP, a few
    KB on the wire, ~50-200 MB decoded) is refused with 422 from its header, before any
    pixel is decoded; nothing is stored."""
    data = png_of(7000)
    assert len(data) < 300_000
    with pytest.raises(imaging.ImageRejected) as info:  # from the header: no decode
        imaging.inspect(data[:64], max_pixels=Settings().image_max_pixels)
    assert info.value.kind == "pixels"
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        assert gw.settings.image_max_pixels == 40_000_000
        r = await upload(gw, data, name="huge.png", ctype="image/png")
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["errors"][0]["loc"] == ["file"]
        assert await upload_rows(gw) == 0 and stored_files(tmp_path) == []
        r = await upload(gw, png_of(6000), name="big.png", ctype="image/png")  # 36 MP: fine
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
async def test_icc_profiles_are_not_stored(fmt: str, db_url: str, sim: Sim, tmp_path: Path) -> None:
    """An ICC profile is caller-supplied bytes: a hostile one (here carrying a <script>) is
    dropped; a real one is applied to the pixels (converted to sRGB), then dropped too."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        for icc in (HOSTILE_ICC, srgb):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (200, 40, 10)).save(buf, fmt, icc_profile=icc)
            sent = buf.getvalue()
            assert Image.open(io.BytesIO(sent)).info["icc_profile"] == icc
            ctype = f"image/{fmt.lower()}"
            r = await upload(gw, sent, name=f"x.{fmt.lower()}", ctype=ctype)
            assert r.status_code == 201, r.text
            async with httpx.AsyncClient() as anon:
                stored = (await anon.get(r.json()["url"])).content
            im = Image.open(io.BytesIO(stored))
            assert "icc_profile" not in im.info and b"<script>" not in stored
            assert b"acsp" not in stored  # the ICC signature, anywhere in the file
            r_, g_, b_ = im.convert("RGB").getpixel((20, 15))
            assert abs(r_ - 200) < 8 and abs(g_ - 40) < 8 and abs(b_ - 10) < 8


async def test_decoding_is_bounded_per_process() -> None:
    """imaging.in_thread runs at most `concurrency` decodes at once; the others queue."""
    import threading
    import time

    lock = threading.Lock()
    running = 0
    most = 0

    def decode(data: bytes, *, max_pixels: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)  # holds the slot; what is measured is the overlap
        with lock:
            running -= 1
        return len(data)

    got = await asyncio.gather(
        *(imaging.in_thread(decode, b"x" * i, max_pixels=1, concurrency=2) for i in range(8))
    )
    assert got == list(range(8)) and most == 2
