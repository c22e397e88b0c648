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
    """The stable ``error.code`` of a failed or timed-out task (callers branch on these)."""

    upstream_rejected = "upstream_rejected"  # Wiro refused the request (validation, code 1)
    upstream_failed = "upstream_failed"  # the run finished with a non-zero pexit
    insufficient_balance = "insufficient_balance"  # code 97
    account_suspended = "account_suspended"  # code 0 "Your account has been suspended."
    access_denied = "access_denied"  # no permission, tool-not-accessible, codes 98 and 99
    model_not_found = "model_not_found"  # code 1 "slug-owner-project-not-exist"
    lost = "lost"  # Wiro kept answering "There is no task yet."
    timed_out = "timed_out"


@dataclass(frozen=True)
class Observation:
    """What one Detail says, in our vocabulary.

    ``error_seen`` marks ``task_error``: an interim log event in Wiro's docs ("always wait
    for task_postprocess_end"), shown but never a verdict. ``unsettled`` marks a finished
    task whose Detail carries neither a ``pexit`` nor outputs: the caller reads Detail
    again a few times before calling it a failure (Wiro's own sample has no ``pexit``).
    """

    status: Status
    error_code: ErrorCode | None = None
    message: str | None = None
    error_seen: bool = False
    unsettled: bool = False


def observe(
    upstream_status: str,
    pexit: str | None,
    debug_error: str | None = None,
    *,
    has_outputs: bool = False,
) -> Observation:
    """Map an upstream status (with ``pexit`` and whether outputs came) to ours.

    Only ``task_postprocess_end`` and ``task_cancel`` decide. Success is ``pexit`` "0";
    where ``pexit`` is absent or empty the outputs decide (Wiro's docs: judge by "pexit
    or outputs"), and with neither the verdict waits (``unsettled``). Unknown statuses
    count as running.
    """
    if upstream_status == UPSTREAM_DONE:
        code = (pexit or "").strip()
        if code == "0" or (not code and has_outputs):
            return Observation(Status.succeeded)
        detail = (debug_error or "").strip()[:500]
        if not code:
            return Observation(
                Status.running,
                unsettled=True,
                message=(
                    "upstream finished without pexit and without outputs"
                    + (f": {detail}" if detail else "")
                ),
            )
        msg = f"upstream exited with pexit {code!r}" + (f": {detail}" if detail else "")
        return Observation(Status.failed, ErrorCode.upstream_failed, msg)
    if upstream_status == UPSTREAM_CANCEL:
        return Observation(Status.cancelled)
    if upstream_status in UPSTREAM_QUEUED:
        return Observation(Status.queued)
    if upstream_status in UPSTREAM_ERROR:
        return Observation(Status.running, error_seen=True)
    return Observation(Status.running)
