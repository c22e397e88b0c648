"""CPU of the check every stored output passes (``app.imaging.inspect``): a JPEG decoded
at 1/8 scale, a PNG inflated and checked without undoing its filters, against the full
decode each replaced, in one run on the same bytes.

``python -m bench.decode`` (not part of ``make bench``: it measures one function, not the
gateway). Images: the simulator's output (a 410x512 headshot, JPEG and PNG, and the
512x512 PNG on the office background that the benchmark's tasks ask for) and
seeded-noise JPEGs and PNGs of 1024 and 2048 px a side, whose every block is busy (the
least favourable case for the scaled decode: entropy decoding, which both do in full,
is most of their work; for a PNG, inflating noise is most of the work). Alternating
rounds; the median per image.
"""

from __future__ import annotations

import io
import random
import statistics
import time

from PIL import Image

from app import imaging
from app.simulator.images import render_headshot, sample_portrait

LIMIT = 40_000_000


def _noise(side: int, fmt: str) -> bytes:
    noise = random.Random(side).randbytes(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), noise).save(buf, fmt, quality=90)
    return buf.getvalue()


def _ms(data: bytes, scaled: bool, n: int) -> float:
    t = time.process_time()
    for _ in range(n):
        imaging._open(data, LIMIT, scaled=scaled)
    return 1000 * (time.process_time() - t) / n


def main() -> None:
    portrait = sample_portrait()
    images = {
        f"simulator {fmt} 410x512": render_headshot(
            portrait, background="white", aspect_ratio="", output_format=fmt
        ).data
        for fmt in ("jpeg", "png")
    }
    images["simulator png 512x512, office (the benchmark's)"] = render_headshot(
        portrait, background="office", aspect_ratio="1:1", output_format="png"
    ).data
    images |= {
        f"noise {fmt.lower()} {s}x{s}": _noise(s, fmt)
        for fmt in ("JPEG", "PNG")
        for s in (1024, 2048)
    }
    for name, data in images.items():
        n = max(3, int(200_000 / len(data)))
        full, scaled = [], []
        for _ in range(5):
            full.append(_ms(data, False, n))
            scaled.append(_ms(data, True, n))
        f, s = statistics.median(full), statistics.median(scaled)
        print(
            f"{name} ({len(data) // 1024} KiB): full {f:.2f} ms, "
            f"as inspect checks it {s:.2f} ms (x{s / f:.2f})"
        )


if __name__ == "__main__":
    main()
