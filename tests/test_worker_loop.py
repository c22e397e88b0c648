"""The shared worker loop (app/workers/loop.py) on its own: when it claims. Each claim is
a write (on SQLite a write turn), so a claim that can find nothing is work wasted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app import metrics
from app.workers.loop import WorkerLoop


async def _settle() -> None:
    """Let every ready callback run (the fakes below do no I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Fake:
    """Due keys, the claims made (each the keys it returned), and a gate per job."""

    def __init__(self, due: list[str]) -> None:
        self.due = list(due)
        self.claims: list[list[str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.done: dict[str, asyncio.Event] = {}

    async def claim(self, n: int) -> list[str]:
        got, self.due = self.due[:n], self.due[n:]
        self.claims.append(got)
        for key in got:
            self.gates.setdefault(key, asyncio.Event())
            self.done.setdefault(key, asyncio.Event())
        return got

    async def act(self, key: str) -> None:
        await self.gates[key].wait()
        self.done[key].set()

    async def release(self) -> None:
        return None

    def loop(self, *, concurrency: int, room: Callable[[], int | None] | None = None) -> WorkerLoop:
        return WorkerLoop(
            "fake",
            claim=self.claim,
            act=self.act,
            release=self.release,
            concurrency=concurrency,
            batch=4,
            idle_s=60.0,  # no idle tick within a test: every claim below was woken
            grace_s=1.0,
            room=room,
        )


async def test_a_job_ending_with_slots_free_claims_nothing() -> None:
    fake = Fake(["a"])
    loop = fake.loop(concurrency=4)
    loop.start()
    try:
        await _settle()
        assert fake.claims == [["a"]]
        fake.gates["a"].set()
        await asyncio.wait_for(fake.done["a"].wait(), timeout=10)
        await _settle()
        # Its last claim found all there was: the job's end claims nothing more.
        assert fake.claims == [["a"]]
        # New work comes with a wake-up, and is claimed at once.
        fake.due.append("b")
        loop.wake()
        await _settle()
        assert fake.claims == [["a"], ["b"]]
        fake.gates["b"].set()
        await asyncio.wait_for(fake.done["b"].wait(), timeout=10)
    finally:
        await loop.stop()


async def test_a_job_ending_while_every_slot_is_taken_wakes_the_loop() -> None:
    fake = Fake(["a", "b", "c"])
    loop = fake.loop(concurrency=2)
    loop.start()
    try:
        await _settle()
        assert fake.claims == [["a", "b"]]  # full: "c" waits for a slot
        fake.gates["a"].set()
        await asyncio.wait_for(fake.done["a"].wait(), timeout=10)
        await _settle()
        assert fake.claims == [["a", "b"], ["c"]]
        # "c" took the last slot, so the loop cannot know that nothing is left: "b"'s
        # end claims again, and finds nothing ...
        fake.gates["b"].set()
        await asyncio.wait_for(fake.done["b"].wait(), timeout=10)
        await _settle()
        assert fake.claims == [["a", "b"], ["c"], []]
        # ... so "c"'s end, with a slot free, claims nothing.
        fake.gates["c"].set()
        await asyncio.wait_for(fake.done["c"].wait(), timeout=10)
        await _settle()
        assert fake.claims == [["a", "b"], ["c"], []]
    finally:
        await loop.stop()


async def test_the_first_claim_waits_for_the_step_before_it() -> None:
    """``serve`` gives back a dead local process's leases before its loops first claim
    (``start(after=...)``), so that the first claim takes those rows."""
    fake = Fake(["a"])
    step_may_end = asyncio.Event()
    seen_by_step: list[int] = []

    async def step() -> None:
        await step_may_end.wait()
        seen_by_step.append(len(fake.claims))

    first = asyncio.ensure_future(step())
    waiting = fake.loop(concurrency=4)
    waiting.start(after=first)
    try:
        await _settle()
        step_may_end.set()
        await first
        await _settle()
        assert seen_by_step == [0]  # nothing was claimed before the step ended
        assert fake.claims == [["a"]]  # then the loop claimed
        fake.gates["a"].set()
        await asyncio.wait_for(fake.done["a"].wait(), timeout=10)
    finally:
        await waiting.stop()


async def test_a_failed_step_before_the_first_claim_does_not_stop_the_loop() -> None:
    fake = Fake(["a"])

    async def step() -> None:
        raise RuntimeError("the database is down")

    first = asyncio.ensure_future(step())
    loop = fake.loop(concurrency=4)
    loop.start(after=first)
    try:
        await asyncio.wait([first])
        await _settle()
        assert fake.claims == [["a"]]
        fake.gates["a"].set()
        await asyncio.wait_for(fake.done["a"].wait(), timeout=10)
    finally:
        await loop.stop()


async def test_handed_work_starts_without_a_claim_and_waits_for_a_slot() -> None:
    """``hand``: keys whose leases this process already took (a terminal write's outputs,
    app.outbox.OutputHandoff) start as slots are free, and call for no claim."""
    fake = Fake([])
    loop = fake.loop(concurrency=2)
    assert not loop.accepting  # not started: a terminal write inserts its rows free
    loop.start()
    try:
        await _settle()
        assert loop.accepting
        assert fake.claims == [[]]  # the first claim, at start
        for key in ("h1", "h2", "h3"):
            fake.gates[key], fake.done[key] = asyncio.Event(), asyncio.Event()
        loop.hand(["h1", "h2", "h3"])
        await _settle()
        assert fake.claims == [[]]  # no claim for handed work
        assert not fake.done["h3"].is_set()
        # Both slots are taken: "h3" waits, and a job's end starts it (still no claim).
        fake.gates["h3"].set()
        await _settle()
        assert not fake.done["h3"].is_set()
        fake.gates["h1"].set()
        await asyncio.wait_for(fake.done["h3"].wait(), timeout=10)
        await _settle()  # "h3"'s end, with a slot free, claims nothing either
        assert fake.done["h1"].is_set()
        assert fake.claims == [[]]
        # A wake-up (work committed for anyone to claim) still claims, beside handed work.
        fake.due.append("c")
        loop.wake()
        await _settle()
        assert fake.claims == [[], ["c"]]
        fake.gates["h2"].set()
        fake.gates["c"].set()
        await asyncio.wait_for(fake.done["c"].wait(), timeout=10)
        await asyncio.wait_for(fake.done["h2"].wait(), timeout=10)
        loop.drain()
        assert not loop.accepting  # draining: later terminal writes insert their rows free
    finally:
        await loop.stop()


async def test_a_loop_with_less_room_starts_fewer_jobs_and_resumes_when_told() -> None:
    """``room`` (``Ctx.room``: submits first): while it is smaller than the loop's own
    concurrency the loop claims only that many; the floor keeps work moving as jobs end;
    ``resume`` starts what was held back at once."""
    fake = Fake(["a", "b", "c", "d", "e"])
    room: list[int | None] = [1]
    loop = fake.loop(concurrency=4, room=lambda: room[0])
    held = metrics.BACKGROUND_HELD.labels("fake")
    held_before = held._value.get()
    loop.start()
    try:
        await _settle()
        assert fake.claims == [["a"]]  # one slot of four
        assert held._value.get() > held_before
        fake.gates["a"].set()
        await asyncio.wait_for(fake.done["a"].wait(), timeout=10)
        await _settle()
        assert fake.claims == [["a"], ["b"]]  # a job's end still frees its slot
        # Room again, but nobody said so: nothing more starts ...
        room[0] = None
        await _settle()
        assert fake.claims == [["a"], ["b"]]
        # ... until ``resume``: the three slots left are claimed at once.
        loop.resume()
        await _settle()
        assert fake.claims == [["a"], ["b"], ["c", "d", "e"]]
        for key in "bcde":
            fake.gates[key].set()
        for key in "bcde":
            await asyncio.wait_for(fake.done[key].wait(), timeout=10)
        await _settle()
        # Every slot was taken: the first end claimed again, and found nothing.
        assert fake.claims == [["a"], ["b"], ["c", "d", "e"], []]
        # A loop that was not held back has nothing to resume: no claim.
        loop.resume()
        await _settle()
        assert fake.claims == [["a"], ["b"], ["c", "d", "e"], []]
    finally:
        await loop.stop()
