"""The one status vocabulary, its ranks, and the one mapping from Wiro's Detail.

Ranks only move forward; the four terminal statuses share the top rank, so once a task
is terminal no other status can replace it (every status write is conditional on
``status_rank < new rank``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    pending = "pending"  # recorded here, not yet accepted upstream
    queued = "queued"  # task_queue, task_accept
    running = "running"  # any other non-terminal upstream status
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"

    @property
    def rank(self) -> int:
        return RANK[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.succeeded, Status.failed, Status.cancelled, Status.timed_out})
RANK: dict[Status, int] = {
    Status.pending: 0,
    Status.queued: 1,
    Status.running: 2,
    **{s: 3 for s in TERMINAL},
}
TERMINAL_RANK = 3

UPSTREAM_QUEUED = frozenset({"task_queue", "task_accept"})
UPSTREAM_ERROR = frozenset({"task_error", "task_error_full"})
UPSTREAM_DONE = "task_postprocess_end"
UPSTREAM_CANCEL = "task_cancel"


class ErrorCode(StrEnum):
    upstream_rejected = "upstream_rejected"
    upstream_failed = "upstream_failed"
    insufficient_balance = "insufficient_balance"
    lost = "lost"
    timed_out = "timed_out"


@dataclass(frozen=True)
class Observation:
    """What one Detail says, in our vocabulary.

    ``error_seen`` marks ``task_error``: Wiro's docs call it a log event, its MCP server
    a fatal failure, so it only fails a task when it persists (the caller decides).
    """

    status: Status
    error_code: ErrorCode | None = None
    message: str | None = None
    error_seen: bool = False


def observe(upstream_status: str, pexit: str | None, debug_error: str | None = None) -> Observation:
    """Map an upstream status (and ``pexit``) to ours. Unknown statuses count as running."""
    if upstream_status == UPSTREAM_DONE:
        if pexit == "0":
            return Observation(Status.succeeded)
        detail = (debug_error or "").strip()[:500]
        msg = f"upstream exited with pexit {pexit!r}" + (f": {detail}" if detail else "")
        return Observation(Status.failed, ErrorCode.upstream_failed, msg)
    if upstream_status == UPSTREAM_CANCEL:
        return Observation(Status.cancelled)
    if upstream_status in UPSTREAM_QUEUED:
        return Observation(Status.queued)
    if upstream_status in UPSTREAM_ERROR:
        return Observation(Status.running, error_seen=True)
    return Observation(Status.running)
