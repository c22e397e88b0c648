"""Every state column's vocabulary, as StrEnums (the task's own ``Status`` lives in
``app.lifecycle`` with its ranks).

A StrEnum member *is* its string, so rows, statements and JSON carry the same values as
before; code compares against members instead of bare literals.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """``task_attempts.outcome``: what became of one Run."""

    sent = "sent"  # committed before Run was sent; no answer recorded yet
    accepted = "accepted"  # Run answered with an upstream task id (linked)
    rejected = "rejected"  # Run refused (retryable or not); nothing started upstream
    not_sent = "not_sent"  # the request never reached Wiro (connect error)
    ambiguous = "ambiguous"  # no usable answer: it may or may not have started a task
    abandoned = "abandoned"  # ambiguous, and looked for in vain past the grace period
    extra_killed = "extra_killed"  # it started a second upstream task, which was stopped


# An attempt whose Run may have started an upstream task nobody has linked yet.
UNANSWERED = (Outcome.sent, Outcome.ambiguous)


class EventKind(StrEnum):
    """What an event records. Decide on this, never on the wording of ``message``, which
    is for people and may change."""

    # the task's own life
    created = "created"  # accepted by the gateway (pending)
    linked = "linked"  # an attempt's Run was accepted upstream (queued)
    progressed = "progressed"  # Detail moved the status forward (running, terminal)
    upstream_status = "upstream_status"  # Detail showed a new upstream stage, same status
    failed = "failed"  # the upstream refused the Run for good, or lost the task
    timed_out = "timed_out"  # the deadline passed
    # Runs
    run_retry = "run_retry"  # Run refused or unreachable; another attempt later
    run_ambiguous = "run_ambiguous"  # Run unanswered; looked for before any new Run
    run_abandoned = "run_abandoned"  # an unanswered Run looked for in vain
    extra_stopped = "extra_stopped"  # a second upstream task was found and stopped
    detail_failed = "detail_failed"  # Task/Detail could not be read (first of a run)
    # cancel
    cancel_requested = "cancel_requested"
    cancel_sent = "cancel_sent"  # what Task/Cancel or Task/Kill answered
    cancelled = "cancelled"  # cancelled (locally while pending, or confirmed upstream)
    # after the end
    notification_delivered = "notification_delivered"  # a webhook was answered 2xx
    notification_failed = "notification_failed"  # a webhook delivery gave up
    images_erased = "images_erased"  # stored images and inputs erased (DELETE, retention)
    upstream_erased = "upstream_erased"  # Wiro deleted its copies of inputs and outputs
    upstream_erase_retry = "upstream_erase_retry"  # deleting Wiro's copies: will retry
    upstream_erase_failed = "upstream_erase_failed"  # deleting Wiro's copies gave up


class DeliveryStatus(StrEnum):
    """``deliveries.status``: a webhook notification."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class OutputState(StrEnum):
    """``stored_outputs.state``: the gateway's copy of one result image."""

    pending = "pending"
    stored = "stored"
    failed = "failed"
    erased = "erased"


class ErasureState(StrEnum):
    """``erasures.upstream_state``: deleting Wiro's copies of a task's files."""

    pending = "pending"
    done = "done"
    skipped = "skipped"
    failed = "failed"
