"""Prometheus metrics: the metric objects, tiny helpers to record them, and ``render``.

Instrumented code calls the helpers (``metrics.callback("accepted")``), never the objects,
so the names and labels live here and nowhere else. Labels are closed sets (route
templates, endpoint names, outcome words) so the number of series stays bounded.

Counters and histograms are per process. With ``PROMETHEUS_MULTIPROC_DIR`` set (several
worker processes behind one port) ``prometheus_client`` writes them to files in that
directory and ``render`` merges every process's files with ``MultiProcessCollector``.
The task gauges (``gateway_tasks`` by unfinished status, ``gateway_pending_tasks``, the
oldest unfinished task's age) are not kept in memory at all: they are read from the
database at scrape time (a ``GROUP BY`` over the few unfinished rows, cached a few
seconds; see ``DbGauges``), so every replica and process reports the same numbers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from app.lifecycle import Status
from app.states import DeliveryStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# No ``*_created`` series next to every counter and histogram: they double the series
# count and no alert here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HTTP_REQUESTS = Counter(
    "gateway_http_requests",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=_SLOW,
)
UPSTREAM_REQUESTS = Counter(
    "gateway_upstream_requests",
    "Calls to Wiro, by endpoint and outcome "
    "(ok, or the error class: unavailable, rate_limited, concurrency_limit, ambiguous, "
    "rejected, insufficient_balance, auth_error, state_error, server_error, "
    "validation_error, access_denied, config_error).",
    ["endpoint", "outcome"],
)
UPSTREAM_CONFIG_FAULTS = Counter(
    "gateway_upstream_config_faults",
    "Runs refused because of the gateway's own upstream "
    "configuration (credentials, base URL): retried with backoff, but an operator must "
    "fix the cause. Alert on any increase.",
    ["kind"],
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_request_duration_seconds",
    "Latency of calls to Wiro.",
    ["endpoint", "outcome"],
    buckets=_SLOW,
)
CALLBACKS = Counter(
    "gateway_callbacks",
    "Wiro callbacks received: accepted (task marked due), unknown "
    "(no such task or wrong token: forged or stale), duplicate (the task was already "
    "terminal: a duplicate or late callback).",
    ["outcome"],
)
POLLS = Counter(
    "gateway_polls",
    "Task/Detail reads of submitted tasks, by what triggered them "
    "(poll: the schedule; callback: a callback marked the task due).",
    ["trigger"],
)
TASKS_FINISHED = Counter(
    "gateway_tasks_finished",
    "Tasks that reached a terminal status, by status and by "
    "what finished them (callback, poll, dispatcher, cancel, timeout).",
    ["status", "source"],
)
TASK_TRANSITIONS = Counter(
    "gateway_task_transitions",
    "Status changes of tasks, by the status moved to (pending "
    "when accepted, queued, running, and the terminal ones): one per transition, from the "
    "one place that writes a task's status.",
    ["status"],
)
SUBMIT_OVERHEAD = Histogram(
    "gateway_submit_overhead_seconds",
    "Time to handle a successful POST /v1/tasks minus "
    "the time spent waiting for Wiro (the gateway's own cost per submit).",
    buckets=_FAST,
)
NOTIFICATION_ATTEMPTS = Counter(
    "gateway_notification_attempts",
    "Webhook deliveries attempted, by outcome "
    "(delivered, failed: non-2xx, timeout or refused, will be retried or gives up).",
    ["outcome"],
)
NOTIFICATIONS_EXHAUSTED = Counter(
    "gateway_notifications_exhausted", "Webhook deliveries abandoned after the last retry."
)
LEASES_RECLAIMED = Counter(
    "gateway_leases_reclaimed",
    "Leases given back when the gateway started because the process "
    "holding them had ended on this machine (a crash): their work is taken up at once "
    "instead of when the leases run out (GATEWAY_LEASE_S). By table.",
    ["table"],
)
OUTPUTS_COPIED_FIRST = Counter(
    "gateway_outputs_copied_first",
    "Outputs of a success read by a check, by what became of them before the success was "
    "recorded (GATEWAY_OUTPUT_COPY_FIRST_S): stored, deferred (not stored in time, or "
    "failed: the output loop downloads it), busy (not tried: the replica was busy).",
    ["outcome"],
)
BACKGROUND_HELD = Counter(
    "gateway_background_held",
    "Times a background loop (scheduler, outputs, notifier, eraser) left due work waiting "
    "because the replica was answering more submits than GATEWAY_SUBMITS_FIRST_AT with "
    "its event loop busy.",
    ["loop"],
)
OUTBOUND_RECLAIMED = Counter(
    "gateway_outbound_connections_reclaimed",
    "Outbound connections (to Wiro, download hosts, webhook receivers) "
    "that a request cancelled or timed out on the pool left neither usable nor closed "
    "(httpcore#1093), taken out of their pool and closed.",
)
WAITERS = Gauge(
    "gateway_waiters",
    "Requests held open waiting on a task: `Prefer: wait` calls and "
    "event streams (GATEWAY_MAX_WAITERS_PER_CLIENT bounds them per client).",
    multiprocess_mode="livesum",
)

CALLBACK_OUTCOMES = ("accepted", "unknown", "duplicate")
for _outcome in CALLBACK_OUTCOMES:  # series exist at 0, so rate() and alerts work at once
    CALLBACKS.labels(_outcome)
for _outcome in (DeliveryStatus.delivered, DeliveryStatus.failed):
    NOTIFICATION_ATTEMPTS.labels(_outcome)
for _kind in ("auth", "url"):
    UPSTREAM_CONFIG_FAULTS.labels(_kind)
for _status in Status:
    TASK_TRANSITIONS.labels(_status.value)


# ---------------------------------------------------------------- helpers to call

# Each labelled series looked up once (``labels()`` takes a lock and checks its values on
# every call, ~0.9 us; a dict hit ~0.2 us). The label sets are closed, so this stays
# small. A series made in one process and incremented in a forked one is fine: its value
# follows the process id on every change (``PROMETHEUS_MULTIPROC_DIR``).
_series: dict[tuple[object, ...], Any] = {}


def _one(metric: Counter | Histogram, *values: str) -> Any:
    key = (metric, *values)
    found = _series.get(key)
    if found is None:
        found = _series[key] = metric.labels(*values)
    return found


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    _one(HTTP_REQUESTS, method, route, str(status)).inc()
    _one(HTTP_DURATION, method, route).observe(seconds)


def callback(outcome: str) -> None:
    """One of ``CALLBACK_OUTCOMES``."""
    _one(CALLBACKS, outcome).inc()


def poll(trigger: str) -> None:
    _one(POLLS, trigger).inc()


def task_finished(status: str, source: str) -> None:
    _one(TASKS_FINISHED, status, source).inc()


def task_transition(status: str) -> None:
    """Call once per status change, with the status moved to, where the status is written
    (together with its event)."""
    _one(TASK_TRANSITIONS, status).inc()


def upstream_config_fault(kind: str) -> None:
    _one(UPSTREAM_CONFIG_FAULTS, kind).inc()


def notification_attempt(outcome: str) -> None:
    """Call once per webhook delivery attempt: ``"delivered"`` or ``"failed"``."""
    _one(NOTIFICATION_ATTEMPTS, outcome).inc()


def notification_exhausted() -> None:
    """Call when a delivery is given up after its last attempt."""
    NOTIFICATIONS_EXHAUSTED.inc()


def outbound_connections_reclaimed(count: int) -> None:
    OUTBOUND_RECLAIMED.inc(count)


def waiters(delta: int) -> None:
    WAITERS.inc(delta)


def submit_overhead(seconds: float) -> None:
    SUBMIT_OVERHEAD.observe(max(0.0, seconds))


# Time spent waiting for Wiro in the current request. A mutable holder, so the check that
# a submit runs in its own asyncio task (which copies the context) adds to the same one.
_upstream_wait: ContextVar[list[float] | None] = ContextVar("upstream_wait", default=None)


def start_upstream_clock() -> list[float]:
    holder = [0.0]
    _upstream_wait.set(holder)
    return holder


def upstream_endpoint(path: str) -> str:
    """``/Run/wiro/professional-headshot`` → ``Run``; ``/Task/Detail`` → ``Task/Detail``."""
    return "Run" if path.startswith("/Run/") else path.strip("/")


def upstream_call(endpoint: str, error: BaseException | None, seconds: float) -> None:
    outcome = "ok" if error is None else _error_outcome(error)
    _one(UPSTREAM_REQUESTS, endpoint, outcome).inc()
    _one(UPSTREAM_DURATION, endpoint, outcome).observe(seconds)
    holder = _upstream_wait.get()
    if holder is not None:
        holder[0] += seconds


_OUTCOMES = {
    "WiroUnavailable": "unavailable",
    "WiroRateLimited": "rate_limited",
    "WiroConcurrencyLimit": "concurrency_limit",
    "WiroAmbiguous": "ambiguous",
    "WiroRejected": "rejected",
    "WiroInsufficientBalance": "insufficient_balance",
    "WiroAuthError": "auth_error",
    "WiroStateError": "state_error",
    "WiroServerError": "server_error",
    "WiroValidationError": "validation_error",
    "WiroAccessDenied": "access_denied",
    "WiroConfigError": "config_error",
}


def _error_outcome(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return _OUTCOMES.get(type(error).__name__, "error")


# ---------------------------------------------------------------- scrape


@dataclass
class DbSnapshot:
    """What the database says about all tasks, read at scrape time."""

    by_status: dict[str, int]
    oldest_unfinished_created: float | None  # epoch seconds


@dataclass
class DbGauges:
    """The database-backed gauges, re-read at most every ``ttl_s`` seconds (a scrape from
    each of several Prometheis must not each cost a query)."""

    read: Callable[[], Awaitable[DbSnapshot]]
    ttl_s: float = 5.0
    _value: DbSnapshot | None = None
    _at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> DbSnapshot | None:
        """The snapshot, or None when the database cannot be read."""
        async with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                try:
                    self._value = await self.read()
                except Exception:  # reported as gateway_database_up 0
                    self._value = None
                self._at = time.monotonic()
            return self._value


def _db_families(snap: DbSnapshot | None, statuses: Iterable[str]) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "gateway_database_up", "1 if the last scrape could read the database, else 0."
    )
    up.add_metric([], 0.0 if snap is None else 1.0)
    yield up
    if snap is None:
        return
    tasks = GaugeMetricFamily(
        "gateway_tasks",
        "Unfinished tasks by status (pending, queued, running). Finished "
        "ones accumulate forever: see gateway_tasks_finished_total.",
        labels=["status"],
    )
    for status in statuses:
        tasks.add_metric([status], float(snap.by_status.get(status, 0)))
    yield tasks
    yield GaugeMetricFamily(
        "gateway_pending_tasks",
        "Queue depth: tasks recorded but not yet accepted by Wiro.",
        value=float(snap.by_status.get("pending", 0)),
    )
    age = 0.0
    if snap.oldest_unfinished_created is not None:
        age = max(0.0, time.time() - snap.oldest_unfinished_created)
    yield GaugeMetricFamily(
        "gateway_oldest_unfinished_task_age_seconds",
        "Age of the oldest task not yet terminal (0 when there is none).",
        value=age,
    )


class _Collect:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render(snap: DbSnapshot | None, statuses: Iterable[str]) -> bytes:
    """The exposition text: this process's (or every process's) metrics + the DB gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Collect(REGISTRY.collect))
    statuses = list(statuses)
    registry.register(_Collect(lambda: _db_families(snap, statuses)))
    return generate_latest(registry)
