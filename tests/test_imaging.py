"""``imaging.inspect``, the check every stored output passes: a JPEG is decoded at 1/8
scale there (libjpeg's DCT scaling), which must refuse exactly what a full decode refuses
and report the size from the header."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from app import imaging

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
