"""Pillow work of the simulator: the sample portrait and the "headshot" it outputs.

The output is a real image built from the input: center-cropped to the requested aspect
ratio, shrunk to at most ``MAX_SIDE`` px, and set as an oval vignette on the requested
background. Everything here is synchronous and CPU-bound: callers run it in a thread.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

MAX_SIDE = 512
BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "neutral": (222, 210, 190),  # beige
    "gray": (128, 128, 128),
}
FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}


class ImageFailure(Exception):
    """The input could not be turned into an output; the message goes to debugerror."""


@dataclass(frozen=True)
class RenderedImage:
    data: bytes
    name: str
    contenttype: str
    width: int
    height: int


@lru_cache(maxsize=1)
def sample_portrait() -> bytes:
    """A 640x800 JPEG of a drawn head-and-shoulders figure on a plain background."""
    w, h = 640, 800
    img = Image.new("RGB", (w, h), (196, 208, 222))
    d = ImageDraw.Draw(img)
    skin, suit, hair = (226, 188, 160), (38, 48, 72), (62, 42, 30)
    d.ellipse((40, 560, 600, 1100), fill=suit)  # shoulders
    d.polygon([(270, 570), (370, 570), (320, 680)], fill=(245, 245, 245))  # shirt
    d.polygon([(308, 590), (332, 590), (326, 690), (314, 690)], fill=(140, 30, 40))  # tie
    d.rectangle((280, 470, 360, 585), fill=skin)  # neck
    d.ellipse((210, 190, 430, 500), fill=skin)  # head
    d.chord((200, 160, 440, 380), 180, 360, fill=hair)  # hair
    d.ellipse((198, 320, 222, 380), fill=skin)  # ears
    d.ellipse((418, 320, 442, 380), fill=skin)
    for x in (270, 350):  # eyes
        d.ellipse((x - 14, 330, x + 14, 346), fill=(255, 255, 255))
        d.ellipse((x - 6, 332, x + 6, 344), fill=(50, 40, 30))
    d.line((320, 350, 310, 410, 326, 412), fill=(190, 140, 120), width=3)  # nose
    d.arc((280, 410, 360, 460), 20, 160, fill=(150, 60, 60), width=4)  # mouth
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _ratio(aspect_ratio: str) -> float | None:
    if not aspect_ratio:
        return None
    w, h = aspect_ratio.split(":")
    return int(w) / int(h)


def _center_crop(img: Image.Image, ratio: float | None) -> Image.Image:
    if ratio is None:
        return img
    w, h = img.size
    if w / h > ratio:
        new_w = max(1, round(h * ratio))
        left = (w - new_w) // 2
        return img.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w / ratio))
    top = (h - new_h) // 2
    return img.crop((0, top, w, top + new_h))


@lru_cache(maxsize=64)
def _office(size: tuple[int, int]) -> Image.Image:
    """A blurred office: warm wall gradient, a window, a shelf and a desk edge."""
    w, h = size
    top, bottom = (214, 204, 188), (150, 138, 122)
    img = Image.new("RGB", (1, h))
    for y in range(h):
        t = y / max(1, h - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        img.putpixel((0, y), colour)
    img = img.resize((w, h))
    d = ImageDraw.Draw(img)
    d.rectangle((w * 0.06, h * 0.08, w * 0.38, h * 0.55), fill=(190, 215, 235))  # window
    d.line((w * 0.22, h * 0.08, w * 0.22, h * 0.55), fill=(240, 240, 240), width=max(1, w // 80))
    d.line((w * 0.06, h * 0.3, w * 0.38, h * 0.3), fill=(240, 240, 240), width=max(1, w // 80))
    d.rectangle((w * 0.68, h * 0.12, w * 0.95, h * 0.6), fill=(96, 72, 52))  # shelf
    for i, colour in enumerate([(150, 40, 40), (40, 90, 130), (200, 170, 60), (60, 120, 70)]):
        x = w * (0.71 + 0.055 * i)
        d.rectangle((x, h * 0.18, x + w * 0.04, h * 0.3), fill=colour)
    d.rectangle((0, h * 0.82, w, h), fill=(110, 84, 60))  # desk
    return img.filter(ImageFilter.GaussianBlur(radius=max(1, w // 120)))


def _background(name: str, size: tuple[int, int]) -> Image.Image:
    if name == "office":
        return _office(size).copy()  # cached: never paste onto the original
    return Image.new("RGB", size, BACKGROUNDS[name])


@lru_cache(maxsize=64)
def _oval_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, size[0] - 1, size[1] * 1.4), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(radius=max(1, min(size) // 30)))


def _decode(data: bytes) -> Image.Image:
    try:
        opened = Image.open(io.BytesIO(data))
        if opened.format not in ("JPEG", "PNG"):
            raise ImageFailure(f"input image must be jpeg or png, got {opened.format or 'unknown'}")
        opened.draft("RGB", (MAX_SIDE * 2, MAX_SIDE * 2))  # JPEG: decode at reduced scale
        return ImageOps.exif_transpose(opened).convert("RGB")
    except ImageFailure:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFailure(f"cannot decode input image: {exc}") from exc


def render_headshot(
    data: bytes, *, background: str, aspect_ratio: str, output_format: str
) -> RenderedImage:
    """Crop ``data`` to ``aspect_ratio`` and set it on ``background`` as a ``output_format``."""
    photo = _center_crop(_decode(data), _ratio(aspect_ratio))
    scale = min(1.0, MAX_SIDE / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    photo = photo.resize(size, Image.Resampling.LANCZOS)

    canvas = _background(background, size)
    # The subject: the photo at 90 %, bottom-centred, through a soft oval mask.
    inner = (max(1, round(size[0] * 0.9)), max(1, round(size[1] * 0.9)))
    subject = photo.resize(inner, Image.Resampling.BILINEAR)
    canvas.paste(subject, ((size[0] - inner[0]) // 2, size[1] - inner[1]), _oval_mask(inner))

    pil_format, contenttype = FORMATS[output_format]
    buf = io.BytesIO()
    if pil_format == "JPEG":
        canvas.save(buf, pil_format, quality=85)
    else:
        canvas.save(buf, pil_format, compress_level=3)
    return RenderedImage(buf.getvalue(), f"0.{output_format}", contenttype, *size)


_cache: OrderedDict[tuple[str, str, str, str], RenderedImage] = OrderedDict()
_cache_lock = threading.Lock()  # render_cached runs in worker threads


def _key(
    data: bytes, background: str, aspect_ratio: str, output_format: str
) -> tuple[str, str, str, str]:
    return (hashlib.sha256(data).hexdigest(), background, aspect_ratio, output_format)


def cached(
    data: bytes, *, background: str, aspect_ratio: str, output_format: str
) -> RenderedImage | None:
    """What ``render_cached`` holds for these arguments already, or None (no rendering:
    cheap enough for the event loop, so that a hit costs no thread hop)."""
    return _hit(_key(data, background, aspect_ratio, output_format))


def _hit(key: tuple[str, str, str, str]) -> RenderedImage | None:
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
        return hit


def render_cached(
    data: bytes, *, background: str, aspect_ratio: str, output_format: str
) -> RenderedImage:
    """``render_headshot`` behind a small LRU keyed by the input's hash and the options.

    Benchmarks submit the same sample over and over; without this the simulator's
    rendering, not the gateway, would set the pace.
    """
    key = _key(data, background, aspect_ratio, output_format)
    hit = _hit(key)
    if hit is not None:
        return hit
    rendered = render_headshot(
        data, background=background, aspect_ratio=aspect_ratio, output_format=output_format
    )
    with _cache_lock:
        _cache[key] = rendered
        while len(_cache) > 64:
            _cache.popitem(last=False)
    return rendered
