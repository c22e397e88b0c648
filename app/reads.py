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
its decode and re-encode take.)

One buffer serves every connection of a thread's event loop: a loop fills it and hands
it on in one go (``get_buffer``, the read, ``buffer_updated``, with nothing in between),
and each read is copied out before it is handed on. A buffer per connection would cost
16 KiB for every idle keep-alive connection and every held ``Prefer: wait`` caller.

uvloop takes the buffered path only for a protocol that is not an ``asyncio.Protocol``,
which uvicorn's is: hence a thin wrapper that hands each read to it as ``data_received``.

**Writes.** uvicorn writes a response's head and its body separately (two ``send``
calls, two system calls, two packets). The protocol writes through ``HeldWrites``
instead, which holds what is written in one step of the event loop and sends it together
at the end of that step (``call_soon``), or at once when ``HELD_BYTES`` would be held (a
part that large is sent as it is, after the held ones) or the connection is closing. A
plain response (head and body sent one after the other, with nothing to wait for in
between) leaves in one write; a streamed one's head and each part still leave in the
step they were written in.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

READ_BYTES = 16 * 1024
HELD_BYTES = 64 * 1024


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
        self.http.connection_made(HeldWrites(transport))  # type: ignore[arg-type]

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
        self.http.data_received(bytes(self._view[:nbytes]))


class HeldWrites:
    """A transport whose writes within one step of the event loop leave in one write of
    the transport underneath, at the end of the step (see the module's docstring). Every
    other call goes to that transport; a close or end of writing sends what is held
    first, an abort drops it."""

    __slots__ = ("_held", "_held_n", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._held_n = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held_n + len(data) >= HELD_BYTES:
            self.flush(data)  # a large part goes as it is, not copied into the held ones
            return
        self._held.append(data)
        self._held_n += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._end_of_step)

    def _end_of_step(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self, large: bytes = b"") -> None:
        """Send what is held (joined), then ``large`` as it is."""
        held = self._held
        self._held, self._held_n = [], 0
        if self._transport.is_closing():
            return  # as the transport drops a write after its close
        if held:
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))
        if large:
            self._transport.write(large)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held, self._held_n = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return int(self._transport.get_write_buffer_size()) + self._held_n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
