"""Checking and cleaning image bytes with Pillow (JPEG and PNG only).

Only the JPEG and PNG decoders are ever asked to open anything (a smaller attack surface
than letting Pillow guess among all its formats), the pixel count is checked from the
header before any pixel is decoded (decompression bombs: ``GATEWAY_IMAGE_MAX_PIXELS``,
with Pillow's own bomb check, which warns from ~89 MP, made an error too), and a decode
must finish. Both functions are CPU-bound and synchronous: call them through
``in_thread``, which runs at most ``GATEWAY_IMAGE_DECODE_CONCURRENCY`` of them at once per
process, so a burst of uploads queues instead of holding that many decoded images in
memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from zlib_ng import zlib_ng

from app import lowpriority

T = TypeVar("T")

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}

_OTHER_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)


class ImageRejected(Exception):
    """The bytes are not an acceptable image. ``kind``: "type" (not JPEG or PNG),
    "decode" (claims to be one but does not decode), "pixels" (too many pixels)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int
    size: int
    sha256: str


def sniff(data: bytes) -> str | None:
    """The content type of JPEG or PNG bytes by their signature, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


def _other(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    return ""


def _open(
    data: bytes, max_pixels: int, *, scaled: bool = False
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode, refusing anything but JPEG/PNG and oversized images; the
    image and its size (the header's).

    ``scaled``: a JPEG is decoded at 1/8 of each side (libjpeg's DCT scaling, Pillow's
    ``draft``), for a check that keeps no pixels. Every block's entropy-coded data is
    still read and decoded, which is where truncated or corrupt data shows; only the
    inverse DCT and the colour conversion work on the smaller image: a third of the CPU
    for the simulator's headshots, three quarters for noise, where entropy decoding is
    most of the work (docs/benchmarks.md, "Issue 15, tenth round"). The image returned
    is then the small one; the size returned is still the header's. A PNG that is not
    interlaced is checked by ``_check_png`` instead of decoded (its image is then not
    loaded)."""
    if sniff(data) is None:
        other = _other(data)
        raise ImageRejected(
            "type",
            f"only JPEG and PNG images are accepted (this is "
            f"{'a ' + other + ' image' if other else 'not one'})",
        )
    try:
        # Image.open reads only the header (the size); the check below applies our own
        # limit before any pixel is decoded. Pillow's own check (at open) is a second line.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(FORMATS))
        width, height = im.size
        if width * height > max_pixels:
            raise ImageRejected(
                "pixels",
                f"the image is {width}x{height} pixels, over the limit of {max_pixels} pixels",
            )
        if scaled and im.format == "JPEG":
            im.draft(im.mode, ((width + 7) // 8, (height + 7) // 8))
        if scaled and im.format == "PNG" and data[12:16] == b"IHDR" and data[28:29] == b"\x00":
            _check_png(data, im)
        else:
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("pixels", f"the image has too many pixels: {e}") from None
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageRejected(
            "decode", f"the image could not be decoded ({type(e).__name__})"
        ) from None
    if width <= 0 or height <= 0:
        raise ImageRejected("decode", "the image has no pixels")
    return im, (width, height)


# Samples per pixel by PNG colour type (greyscale, RGB, palette, grey+alpha, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_INFLATE_STEP = 1 << 20  # bytes of decompressed rows held at a time
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# zlib-ng's inflate is zlib's, about 2.5 times as fast on the simulator's PNGs
# (docs/benchmarks.md, forty-third round). Its stub declares ``error`` as an instance.
_INFLATE_ERROR = cast(type[Exception], zlib_ng.error)


def _check_png(data: bytes, im: Image.Image) -> None:
    """A non-interlaced PNG checked whole without its pixel work (for ``inspect``).

    Pillow's ``verify`` reads every chunk through ``IEND`` and checks each one's CRC
    (which the full decode does not do for the image data). The image data is then
    inflated by zlib-ng (which checks the stream and its Adler-32) in steps of
    ``_INFLATE_STEP`` bytes, and must come to exactly ``height`` rows of the header's
    size, each starting with a known filter type (0-4). What is left out is undoing the
    filters and unpacking the pixels: about 80 % of a full decode's CPU for the
    simulator's PNGs (``python -m bench.decode``). It refuses everything a full decode refuses
    (``tests/test_imaging.py``), and a few files that a full decode accepts: a cut
    ``IEND``, a chunk whose CRC is wrong, bytes after the end of the stream."""
    im.verify()  # OSError / SyntaxError for a cut file or a wrong CRC: ``_open`` maps them
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    samples = _PNG_SAMPLES.get(colour)
    if samples is None:
        raise ImageRejected("decode", "the image has an unknown PNG colour type")
    stride = 1 + (width * samples * depth + 7) // 8
    expected = stride * height
    stream = zlib_ng.decompressobj()
    produced = 0
    view = memoryview(data)
    pos = 8
    ended = False
    try:
        while not ended and pos + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, pos)
            if kind == b"IEND":
                # ``verify`` stops at IEND's type: its CRC is checked here.
                ended = data[pos : pos + 12] == _IEND
                break
            if kind == b"IDAT":
                rest: bytes | memoryview = view[pos + 8 : pos + 8 + length]
                while rest:
                    rows = stream.decompress(rest, _INFLATE_STEP)
                    rest = stream.unconsumed_tail
                    # Each row's first byte, wherever it falls in this step's output.
                    filters = rows[(-produced) % stride :: stride]
                    if (filters and max(filters) > 4) or produced + len(rows) > expected:
                        raise ImageRejected("decode", "the image data does not decode")
                    produced += len(rows)
                    if stream.eof and (rest or stream.unused_data):
                        raise ImageRejected("decode", "the image data does not decode")
            pos += 12 + length
    except _INFLATE_ERROR:
        raise ImageRejected("decode", "the image data does not decode") from None
    if not ended or not stream.eof or produced != expected:
        raise ImageRejected("decode", "the image data is incomplete")


def inspect(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is a whole JPEG or PNG; its facts (a JPEG is decoded at 1/8
    scale, see ``_open``; a non-interlaced PNG is inflated and checked without undoing
    its filters, see ``_check_png``; the size is the header's)."""
    im, (width, height) = _open(data, max_pixels, scaled=True)
    assert im.format in FORMATS
    return ImageInfo(
        content_type=FORMATS[im.format],
        width=width,
        height=height,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """The pixels converted from their embedded ICC profile to sRGB; as they are where
    the profile does not parse or the mode has no transform (the profile is dropped
    either way: it is caller-supplied bytes that would otherwise be stored and served)."""
    mode = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB", "L": "RGB"}.get(im.mode)
    if mode is None:
        return im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(im, source, _SRGB, outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im
    return converted if converted is not None else im


def clean(data: bytes, *, max_pixels: int) -> tuple[bytes, ImageInfo]:
    """Re-encode an uploaded photo: same format, EXIF orientation applied to the pixels,
    and every piece of metadata (EXIF with its GPS position and camera serial, XMP, IPTC,
    comments, PNG text chunks, the ICC profile) left behind. Pixels with an ICC profile
    are converted to sRGB first, so the colours do not change."""
    im, _ = _open(data, max_pixels)
    fmt = im.format
    assert fmt in FORMATS
    icc = im.info.get("icc_profile")
    im = ImageOps.exif_transpose(im) or im
    if icc:
        im = _to_srgb(im, icc)
    # Pillow writes some of ``info`` back by itself (a JPEG comment, the ICC profile):
    # start clean.
    im.info = {k: v for k, v in im.info.items() if k == "transparency"}
    out = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=95)
    else:
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16"):
            im = im.convert("RGBA")
        im.save(out, "PNG")
    cleaned = out.getvalue()
    return cleaned, ImageInfo(
        content_type=FORMATS[fmt],
        width=im.width,
        height=im.height,
        size=len(cleaned),
        sha256=hashlib.sha256(cleaned).hexdigest(),
    )


# ---------------------------------------------------------------- bounded decoding

_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def in_thread(
    fn: Callable[..., T],
    data: bytes,
    *,
    max_pixels: int,
    concurrency: int,
    background: bool = False,
) -> T:
    """``fn(data, max_pixels=…)`` (``inspect`` or ``clean``) in the thread pool, at most
    ``concurrency`` at once in this process (the rest wait their turn); ``background``:
    on the lower-priority threads (``app.lowpriority``: work no request waits on). A
    caller that is cancelled while its decode runs keeps the slot until the thread ends:
    the thread cannot be stopped, and its memory is still in use."""
    loop = asyncio.get_running_loop()
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = asyncio.Semaphore(concurrency)
    async with gate:
        to_thread = lowpriority.to_thread if background else asyncio.to_thread
        job = asyncio.ensure_future(to_thread(fn, data, max_pixels=max_pixels))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait([job])
            raise
