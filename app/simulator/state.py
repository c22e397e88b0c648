"""The simulator's records: tasks, their status walk, and how Wiro would show them.

A task's status is computed from the clock, not advanced by a loop: at creation the task
gets a timeline (the monotonic time at which it reaches each stage), and ``status_at``
reads it. Only two things are written later: ``finished_at`` (set by the task's driver
once the output exists, so ``task_postprocess_end`` never shows without its image) and
``cancelled_at`` (Cancel/Kill). ``to_wire(at)`` renders the Detail shape as it was, or
would have been, at any time ``at``; callbacks and the stale "reorder" callback use that.
``history_at(at)`` lists the stages the task went through, so a test can see a stage that
lasted a few milliseconds without polling for it.

The stage order is the documented one (wiro-api.md): task_queue, task_accept,
task_preprocess_start, task_preprocess_end, task_assign, task_start, task_output,
task_output_full, task_end, task_postprocess_start, task_postprocess_end; task_cancel
instead of the rest when stopped. task_error, when configured, comes between task_start
and task_output (interim), or is where the walk stops (a stuck task).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

MODEL = ("wiro", "professional-headshot")
CATEGORIES = json.dumps(["tool", "image-to-image", "compare-landscape", "use-agent"])
CPS = Decimal("0.000585000000")
CANCELLABLE = frozenset({"task_queue", "task_accept"})  # Task/Cancel; Task/Kill after these
QUEUED = CANCELLABLE
TERMINAL = frozenset({"task_postprocess_end", "task_cancel"})
TRANSIENT_ERROR = "UserWarning: xformers not found"
FATAL_ERROR = "RuntimeError: worker failed to load the model"

# After the queue (queue_s): stage -> offset in tenths of run_s. task_postprocess_start
# gets three tenths because that is where the real output is rendered. An interim
# task_error takes task_output's slot and delays everything from there by task_error_s.
_RUN_STAGES = [
    ("task_preprocess_start", 0),
    ("task_preprocess_end", 1),
    ("task_assign", 2),
    ("task_start", 3),
    ("task_output", 4),
    ("task_output_full", 5),
    ("task_end", 6),
    ("task_postprocess_start", 7),
    ("task_postprocess_end", 10),
]
_ERROR_SLOT = 4


class Fate:
    OK = "ok"
    FAIL = "fail"  # ends with pexit "1"
    LOST = "lost"  # Detail never finds it
    STUCK = "stuck"  # task_error forever


@dataclass(eq=False)
class SimOutput:
    """One stored output file, served at ``/cdn/{folder}/{name}``."""

    id: str
    folder: str
    name: str
    contenttype: str
    parentid: str
    accesskey: str
    task_uuid: str
    data: bytes
    added_wall: float
    finished_mono: float
    size: int = 0

    def __post_init__(self) -> None:
        self.size = len(self.data)

    def to_wire(self, public_url: str) -> dict[str, Any]:
        added = str(int(self.added_wall))
        return {
            "id": self.id,
            "name": self.name,
            "contenttype": self.contenttype,
            "parentid": self.parentid,
            "uuid": self.task_uuid,
            "size": str(self.size),
            "addedtime": added,
            "modifiedtime": added,
            "accesskey": self.accesskey,
            "foldercount": "0",
            "filecount": "0",
            "ispublic": 0,
            "expiretime": None,
            "url": f"{public_url}/cdn/{self.folder}/{self.name}",
        }


@dataclass(eq=False)
class SimFile:
    """A file posted to ``/v1/File/Upload``, served at ``/files/{id}/{name}``."""

    id: str
    name: str
    contenttype: str
    data: bytes


@dataclass(eq=False)
class SimTask:
    id: str
    uuid: str
    token: str
    parameters: dict[str, str]
    callbackurl: str
    gateway_task_id: str | None
    created_mono: float
    created_wall: float
    queue_s: float
    run_s: float
    error_s: float
    fate: str
    cancelled_at: float | None = None
    cancel_kind: str | None = None  # "cancel" | "kill"
    finished_at: float | None = None
    pexit: str = ""
    failure: str = ""
    outputs: list[SimOutput] = field(default_factory=list)
    outputs_deleted: bool = False
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        t0, q, step, err = self.created_mono, self.queue_s, self.run_s / 10, self.error_s
        run = t0 + q
        tl = [("task_queue", t0), ("task_accept", t0 + q / 2)]
        for name, tenths in _RUN_STAGES:
            if tenths == _ERROR_SLOT and (err > 0 or self.fate == Fate.STUCK):
                tl.append(("task_error", run + tenths * step))
                if self.fate == Fate.STUCK:
                    break
            extra = err if tenths >= _ERROR_SLOT else 0.0
            tl.append((name, run + tenths * step + extra))
        self.timeline = tl

    # -- the clock -----------------------------------------------------------------------

    def stage_time(self, name: str) -> float | None:
        if name == "task_postprocess_end":
            return self.finished_at
        for stage, t in self.timeline:
            if stage == name:
                return t
        return None

    @property
    def run_at(self) -> float:
        """The end of the queue: pre-processing (the input download) starts."""
        return self.created_mono + self.queue_s

    @property
    def billable(self) -> bool:
        """Wiro's pricing page: only a successful run (pexit "0") is billed."""
        return self.finished_at is not None and self.pexit == "0"

    @property
    def planned_end(self) -> float:
        return self.timeline[-1][1]

    @property
    def ended_at(self) -> float | None:
        """When the task became terminal (cancel or completion), if it has."""
        return self.cancelled_at if self.cancelled_at is not None else self.finished_at

    def status_at(self, at: float) -> str:
        if self.cancelled_at is not None and at >= self.cancelled_at:
            return "task_cancel"
        if self.finished_at is not None and at >= self.finished_at:
            return "task_postprocess_end"
        status = "task_queue"
        for stage, t in self.timeline:
            if t > at:
                break
            status = stage
        # The end is only shown once the driver has produced the output.
        return "task_postprocess_start" if status == "task_postprocess_end" else status

    def is_terminal(self, at: float) -> bool:
        return self.status_at(at) in TERMINAL

    def history_at(self, at: float) -> list[tuple[str, float]]:
        """Every stage the task went through up to ``at``, with its start time, in order."""
        limit = at if self.cancelled_at is None else min(at, self.cancelled_at)
        seen = [
            (stage, t)
            for stage, t in self.timeline
            if t <= limit and stage != "task_postprocess_end"
        ]
        if self.cancelled_at is not None and self.cancelled_at <= at:
            seen.append(("task_cancel", self.cancelled_at))
        elif self.finished_at is not None and self.finished_at <= at:
            seen.append(("task_postprocess_end", self.finished_at))
        return seen

    def stale_time(self) -> float | None:
        """A time at an intermediate stage before the end (task_start if reached)."""
        end = self.ended_at
        if end is None:
            return None
        reached = [(stage, t) for stage, t in self.timeline if t < end]
        for stage, t in reached:
            if stage == "task_start":
                return t
        return reached[-1][1] if reached else None

    # -- the wire ------------------------------------------------------------------------

    def _wall(self, t: float) -> str:
        return str(int(self.created_wall + (t - self.created_mono)))

    def elapsed_at(self, at: float) -> float:
        stop = min([at, *(t for t in (self.finished_at, self.cancelled_at) if t is not None)])
        return max(0.0, stop - self.run_at)

    def to_wire(self, at: float, public_url: str, *, omit_pexit: bool = False) -> dict[str, Any]:
        """The task exactly as Wiro's Detail would show it at monotonic time ``at``.

        Only a success costs anything (``totalcost``); ``omit_pexit`` leaves the ``pexit``
        key out, as the seed's own Detail sample does.
        """
        status = self.status_at(at)
        limit = at if self.cancelled_at is None else min(at, self.cancelled_at)

        def reached(stage: str) -> str:
            t = self.stage_time(stage)
            return self._wall(t) if t is not None and t <= limit else "0"

        started = self.run_at <= limit
        elapsed = self.elapsed_at(at) if started else 0.0
        elapsed_text = f"{elapsed:.4f}"
        done = status == "task_postprocess_end"
        succeeded = done and self.pexit == "0"
        totalcost = _money(CPS * Decimal(elapsed_text)) if succeeded else "0"

        errors = []
        error_at = self.stage_time("task_error")
        if error_at is not None and error_at <= limit:
            errors.append(FATAL_ERROR if self.fate == Fate.STUCK else TRANSIENT_ERROR)
        if done and self.failure:
            errors.append(self.failure)

        outputs = [o.to_wire(public_url) for o in self.outputs] if succeeded else []
        wire: dict[str, Any] = {
            "id": self.id,
            "uuid": self.uuid,
            "name": "",
            "socketaccesstoken": self.token,
            "parameters": dict(self.parameters),
            "debugoutput": "",
            "debugerror": "\n".join(errors),
            "starttime": reached("task_start"),
            "endtime": reached("task_end"),
            "elapsedseconds": elapsed_text,
            "status": status,
            "cps": str(CPS),
            "totalcost": totalcost,
            "guestid": None,
            "projectid": "699",
            "modelid": "598",
            "description": "",
            "basemodelid": "0",
            "runtype": "model",
            "modelfolderid": "",
            "modelfileid": "",
            "callbackurl": self.callbackurl,
            "marketplaceid": None,
            "createtime": self._wall(self.created_mono),
            "canceltime": self._wall(self.cancelled_at)
            if self.cancelled_at is not None and status == "task_cancel"
            else "0",
            "assigntime": reached("task_assign"),
            "accepttime": reached("task_accept"),
            "preprocessstarttime": reached("task_preprocess_start"),
            "preprocessendtime": reached("task_preprocess_end"),
            "postprocessstarttime": reached("task_postprocess_start"),
            "postprocessendtime": reached("task_postprocess_end"),
            "pexit": self.pexit if done else "",
            "categories": CATEGORIES,
            "outputs": outputs,
            "size": str(sum(o.size for o in self.outputs) if succeeded else 0),
        }
        if omit_pexit:
            del wire["pexit"]
        return wire

    def internal(self, at: float, public_url: str, *, omit_pexit: bool = False) -> dict[str, Any]:
        """Everything the simulator knows about the task (``GET /__sim/tasks/{id}``)."""
        return {
            "id": self.id,
            "fate": self.fate,
            "gateway_task_id": self.gateway_task_id,
            "status": self.status_at(at),
            "billable": self.billable,
            "cancel_kind": self.cancel_kind,
            "age_s": round(at - self.created_mono, 4),
            "timeline": {stage: round(t - self.created_mono, 4) for stage, t in self.timeline},
            "history": [
                {"status": stage, "after_s": round(t - self.created_mono, 4)}
                for stage, t in self.history_at(at)
            ],
            "finished_after_s": _rel(self.finished_at, self.created_mono),
            "cancelled_after_s": _rel(self.cancelled_at, self.created_mono),
            "failure": self.failure,
            "outputs_deleted": self.outputs_deleted,
            "callbacks": list(self.callbacks),
            "detail": None
            if self.fate == Fate.LOST
            else self.to_wire(at, public_url, omit_pexit=omit_pexit),
        }


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 4)


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000000000001")))
