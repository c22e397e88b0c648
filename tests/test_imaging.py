"""``imaging.inspect``, the check every stored output passes: a JPEG is decoded at 1/8
scale there (libjpeg's DCT scaling), which must refuse exactly what a full decode refuses
and report the size from the header."""

from __future__ import annotations

import io
import os
import random
import struct
import sys
import threading
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from app import imaging, lowpriority

LIMIT = 40_000_000


def encoded(fmt: str, size: tuple[int, int], mode: str = "RGB", **options: object) -> bytes:
    # Noise (seeded): every block carries data, so a cut falls inside the scan.
    noise = random.Random(f"{size}").randbytes(size[0] * size[1] * 3)
    im = Image.frombytes("RGB", size, noise).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "size", "mode", "options", "ctype"),
    [
        ("JPEG", (1001, 777), "RGB", {"quality": 85}, "image/jpeg"),
        ("JPEG", (9, 2000), "RGB", {"progressive": True}, "image/jpeg"),
        ("JPEG", (3, 5), "L", {}, "image/jpeg"),
        ("JPEG", (257, 129), "CMYK", {}, "image/jpeg"),
        ("PNG", (333, 111), "RGB", {}, "image/png"),
    ],
)
def test_the_size_is_the_headers(
    fmt: str, size: tuple[int, int], mode: str, options: dict[str, object], ctype: str
) -> None:
    data = encoded(fmt, size, mode, **options)
    info = imaging.inspect(data, max_pixels=LIMIT)
    assert (info.width, info.height, info.content_type, info.size) == (*size, ctype, len(data))


def _outcome(data: bytes, *, scaled: bool) -> str:
    try:
        imaging._open(data, LIMIT, scaled=scaled)
    except imaging.ImageRejected as e:
        return e.kind
    return "ok"


@pytest.mark.parametrize("progressive", [False, True])
def test_a_scaled_check_refuses_what_a_full_decode_refuses(progressive: bool) -> None:
    """Cut anywhere or corrupted in the middle, a JPEG is refused or accepted by the
    1/8-scale check exactly as by a full decode: the scaled decode still reads every
    block's entropy-coded data. (A cut of only the end marker is accepted by both, for
    some images: libjpeg supplies it.)"""
    data = encoded("JPEG", (400, 300), quality=85, progressive=progressive)
    cuts = sorted({len(data) * k // 30 for k in range(1, 30)} | {len(data) - k for k in (1, 2, 50)})
    outcomes = {
        c: (_outcome(data[:c], scaled=True), _outcome(data[:c], scaled=False)) for c in cuts
    }
    assert all(scaled == full for scaled, full in outcomes.values()), outcomes
    assert all(outcomes[c][0] == "decode" for c in cuts if c < len(data) - 2), outcomes
    corrupt = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 200, 7):
        corrupt[i] = 0xFF
    assert _outcome(bytes(corrupt), scaled=True) == _outcome(bytes(corrupt), scaled=False)
    assert _outcome(data, scaled=True) == "ok"


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """PNG bytes from (type, data) chunks, every CRC right."""
    body = b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def _with_rows(data: bytes, change: Callable[[bytearray, int], bytes]) -> bytes:
    """``data`` with its image data inflated, changed by ``change(rows, stride)`` and
    deflated again into one IDAT: a well-formed file whose pixel data is wrong."""
    chunks = _chunks(data)
    width, _, depth, colour = struct.unpack_from(">IIBB", chunks[0][1])
    stride = 1 + (width * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth + 7) // 8
    rows = bytearray(zlib.decompress(b"".join(d for t, d in chunks if t == b"IDAT")))
    idat = zlib.compress(change(rows, stride))
    before = [c for c in chunks if c[0] != b"IDAT" and c[0] != b"IEND"]
    return _png([*before, (b"IDAT", idat), (b"IEND", b"")])


PNG_KINDS = [
    ("RGB", {}),
    ("RGBA", {}),
    ("L", {}),
    ("LA", {}),
    ("P", {}),
    ("1", {}),
    ("I;16", {}),
    ("RGB", {"compress_level": 1}),
]


@pytest.mark.parametrize(("mode", "options"), PNG_KINDS)
def test_a_png_check_refuses_what_a_full_decode_refuses(
    mode: str, options: dict[str, object]
) -> None:
    """A non-interlaced PNG is inflated and checked, not decoded: cut anywhere, with a
    byte of its image data changed, or re-deflated with a wrong filter type, too few
    rows or too many, it is refused wherever a full decode refuses it (and in a few
    places a full decode lets pass: a cut IEND, a wrong CRC, rows past the last)."""
    data = encoded("PNG", (97, 61), mode, **options)
    assert _outcome(data, scaled=True) == _outcome(data, scaled=False) == "ok"
    cuts = sorted({len(data) * k // 40 for k in range(1, 40)} | {len(data) - k for k in (1, 4, 12)})
    for c in cuts:
        assert _outcome(data[:c], scaled=True) == "decode", c
    flipped = []
    for i in range(60, len(data) - 20, max(1, len(data) // 25)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x5A
        flipped.append(bytes(corrupt))

    def bad_filter(rows: bytearray, stride: int) -> bytes:
        rows[stride * 3] = 7
        return bytes(rows)

    def flipped_stream(k: int) -> bytes:
        """The deflate stream itself changed (a byte in its middle third, the CRCs made
        right again): only the inflate's own checks (its codes, its Adler-32) see it."""
        chunks = _chunks(data)
        stream = bytearray(b"".join(d for t, d in chunks if t == b"IDAT"))
        stream[len(stream) // 3 + k * len(stream) // 30] ^= 0x5A
        before = [c for c in chunks if c[0] != b"IDAT" and c[0] != b"IEND"]
        return _png([*before, (b"IDAT", bytes(stream)), (b"IEND", b"")])

    crafted = [
        *(flipped_stream(k) for k in range(10)),
        _with_rows(data, bad_filter),
        _with_rows(data, lambda rows, stride: bytes(rows[:-stride])),
        _with_rows(data, lambda rows, stride: bytes(rows + rows[-stride:])),
        _with_rows(data, lambda rows, stride: bytes(rows[:-1])),
    ]
    assert _outcome(_with_rows(data, lambda rows, stride: bytes(rows)), scaled=True) == "ok"
    for bad in flipped + crafted:
        assert _outcome(bad, scaled=True) == "decode"
    # Every one of these that a full decode refuses, the check refuses (above); and the
    # full decode does refuse most of them, so the cases are not all lenient ones.
    refused_by_full = sum(_outcome(b, scaled=False) != "ok" for b in flipped + crafted)
    assert refused_by_full >= len(flipped + crafted) // 2


def _adam7(width: int, height: int) -> bytes:
    """An interlaced (Adam7) 8-bit RGB PNG of noise: Pillow reads these but does not
    write them."""
    pixels = random.Random(7).randbytes(width * height * 3)
    raw = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):  # fmt: skip
        for y in range(y0, height, dy):
            if x0 < width:
                raw.append(0)
                for x in range(x0, width, dx):
                    raw += pixels[(y * width + x) * 3 : (y * width + x) * 3 + 3]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return _png([(b"IHDR", ihdr), (b"IDAT", zlib.compress(bytes(raw))), (b"IEND", b"")])


def test_an_interlaced_png_is_decoded_whole() -> None:
    """Adam7 rows are not one grid of rows: such a PNG takes the full decode."""
    data = _adam7(50, 40)
    assert _outcome(data, scaled=True) == _outcome(data, scaled=False) == "ok"
    info = imaging.inspect(data, max_pixels=LIMIT)
    assert (info.width, info.height, info.content_type) == (50, 40, "image/png")
    for cut in (len(data) // 3, len(data) // 2, len(data) - 30):
        assert _outcome(data[:cut], scaled=True) == _outcome(data[:cut], scaled=False) == "decode"


def _priority(data: bytes, *, max_pixels: int) -> tuple[int, str]:
    """(As ``inspect`` is called.) The running thread's priority and name."""
    return os.getpriority(
        os.PRIO_PROCESS, threading.get_native_id()
    ), threading.current_thread().name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority")
async def test_a_background_check_runs_below_the_event_loop_and_an_upload_at_its_level() -> None:
    """An output's check (``background``) runs on the lower-priority threads, nice
    ``lowpriority.NICE`` above the event loop's thread (at most 19); an upload's (not
    ``background``: its request waits for it) at the loop's own priority."""
    loop_level = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    level, name = await imaging.in_thread(
        _priority, b"", max_pixels=1, concurrency=2, background=True
    )
    assert level == min(19, loop_level + lowpriority.NICE)
    assert name.startswith("gateway-background")
    level, name = await imaging.in_thread(_priority, b"", max_pixels=1, concurrency=2)
    assert level == loop_level and not name.startswith("gateway-background")
    # The loop's thread itself is left as it was.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_level
