"""The submits the other processes of one ``serve --workers N`` are answering.

Submits first (``Ctx.room``) holds a replica's background work back while it answers
many submits at once. The processes of ``serve --workers N`` are replicas, but they share
one machine's cores: a check or a download running in one takes a core from the submits
of another as surely as from its own. So each counts the whole group's submits: the
supervisor maps one 64-bit count per process, shared (anonymous ``MAP_SHARED``) and made
before it forks them; each process writes its own slot as its count changes and sums
the others' when its loops ask for room. No lock: each slot has one writer, and a count
read a moment late only shifts when work is held back.

A worker that dies leaves its last count behind; the supervisor sets the slot to 0
before it forks the replacement into it (``Board.seat``).
"""

from __future__ import annotations

import mmap


class Board:
    """One count per worker process, in memory its forked children share."""

    def __init__(self, processes: int) -> None:
        self._map = mmap.mmap(-1, 8 * processes)  # anonymous, shared with forked children
        self._counts = memoryview(self._map).cast("q")

    def seat(self, slot: int) -> Siblings:
        """Slot ``slot`` for a process about to be forked (0 until it counts)."""
        self._counts[slot] = 0
        return Siblings(self._counts, slot)


class Siblings:
    """One process's view of the board: its own count to publish, the others' to read."""

    def __init__(self, counts: memoryview, slot: int) -> None:
        self._counts, self.slot = counts, slot

    def publish(self, answering: int) -> None:
        self._counts[self.slot] = answering

    def answering(self) -> int:
        """The submits the other processes are answering now."""
        return sum(self._counts) - self._counts[self.slot]
