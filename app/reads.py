"""uvicorn's HTTP protocol (httptools) fed by reads of at most ``READ_BYTES``.

uvicorn stops reading a connection once its unread body passes 64 KiB (its
``HIGH_WATER_LIMIT``), until the app asks for more; but it checks only after a whole read,
and uvloop reads up to 256,000 bytes at a time. So every connection whose body the app
is not reading yet (a key being checked), is reading slower than it arrives (an upload's
multipart parse) or is reading and dropping (a refusal lingering before it closes) holds
up to ~320 KB: 32 hostile uploads at once, ~10 MiB (bench P9). Reads into a buffer of
16 KiB of our own (uvloop's ``BufferedProtocol`` path) keep that at 80 KiB per
connection; what the app reads is unchanged, only in smaller pieces. (64 KiB reads,
128 KiB per connection, left the 32 uploads of P9 at 7-11 MiB over the idle process;
16 KiB reads at 5-7 MiB. The extra reads of a 10 MiB upload, 640 instead of 160, cost
~5 us each: 9.6 against 7.3 ms of CPU to take in the body, beside the hundreds of ms
its decode and re-encode take.) A connection also stops reading once more than
``UNREAD_BYTES`` (32 KiB) of its body wait for the app, not 64 KiB: at most 48 KiB held
per connection, and each of the app's messages (a copy of what was held) as small. P9's
waves of 32 uploads went from 5-9 MiB over the idle process to ~3-4.5 MiB, and the
over-limit wave's answers took ~15 % longer (more, smaller messages); a 16 KiB mark saved
no more memory and took ~50 % longer (docs/benchmarks.md, forty-third round).

One buffer serves every connection of a thread's event loop: a loop fills it and hands
it on in one go (``get_buffer``, the read, ``buffer_updated``, with nothing in between),
and each read is copied out before it is handed on. A buffer per connection would cost
16 KiB for every idle keep-alive connection and every held ``Prefer: wait`` caller.

uvloop takes the buffered path only for a protocol that is not an ``asyncio.Protocol``,
which uvicorn's is: hence a thin wrapper that hands each read to it as ``data_received``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

READ_BYTES = 16 * 1024
# Body read from a connection and not yet taken by the app, past which the connection
# stops reading (uvicorn's own mark, ``HIGH_WATER_LIMIT``, is 64 KiB).
UNREAD_BYTES = 32 * 1024


class _Buffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BYTES))


_buffer = _Buffer()


class SmallReads(asyncio.BufferedProtocol):
    """An ``HttpToolsProtocol`` (made with the same arguments) reading ``READ_BYTES`` at a
    time into its thread's one buffer. Each read is copied out of the buffer before it is
    handed on (as uvloop does with its own), so the buffer is reused from one read to the
    next, whichever connection it was for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.http = HttpToolsProtocol(*args, **kwargs)
        self._view = _buffer.view

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def eof_received(self) -> None:
        self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        http = self.http
        http.data_received(bytes(self._view[:nbytes]))
        cycle = http.cycle
        if cycle is not None and len(cycle.body) > UNREAD_BYTES:
            http.flow.pause_reading()  # the app's next ``receive`` resumes it
