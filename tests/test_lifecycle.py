"""The one mapping from Wiro's statuses, checked against every recorded payload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.lifecycle import RANK, TERMINAL, ErrorCode, Status, observe
from app.wiro import UpstreamTask

FIXTURES = Path(__file__).parent / "fixtures" / "wiro"


@pytest.mark.parametrize(
    ("upstream", "pexit", "expected"),
    [
        ("task_queue", None, Status.queued),
        ("task_accept", None, Status.queued),
        ("task_assign", None, Status.running),
        ("task_preprocess_start", None, Status.running),
        ("task_start", None, Status.running),
        ("task_output", None, Status.running),
        ("task_output_full", None, Status.running),
        ("task_end", "0", Status.running),  # before post-processing: never judge by it
        ("task_postprocess_start", None, Status.running),
        ("task_postprocess_end", "0", Status.succeeded),
        ("task_postprocess_end", "1", Status.failed),
        ("task_postprocess_end", "", Status.running),  # no verdict yet: outputs decide
        ("task_postprocess_end", None, Status.running),
        ("task_cancel", None, Status.cancelled),
        ("task_error", None, Status.running),
        ("task_something_new", None, Status.running),
    ],
)
def test_mapping(upstream: str, pexit: str | None, expected: Status) -> None:
    assert observe(upstream, pexit).status == expected


def test_without_pexit_the_outputs_decide() -> None:
    ok = observe("task_postprocess_end", None, has_outputs=True)
    assert ok.status == Status.succeeded and not ok.unsettled
    open_ = observe("task_postprocess_end", "", has_outputs=False)
    assert open_.status == Status.running and open_.unsettled
    # A pexit, when there is one, decides whatever the outputs.
    assert observe("task_postprocess_end", "1", has_outputs=True).status == Status.failed
    assert observe("task_postprocess_end", "0", has_outputs=False).status == Status.succeeded


def test_task_error_is_only_a_flag() -> None:
    obs = observe("task_error", None)
    assert obs.status == Status.running and obs.error_seen
    failed = observe("task_postprocess_end", "1", "CUDA out of memory")
    assert failed.error_code == ErrorCode.upstream_failed
    assert "CUDA out of memory" in (failed.message or "")


def test_ranks_move_forward_and_terminals_share_the_top() -> None:
    assert RANK[Status.pending] < RANK[Status.queued] < RANK[Status.running]
    assert {RANK[s] for s in TERMINAL} == {max(RANK.values())}
    assert all(s.terminal for s in TERMINAL) and not Status.running.terminal


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("detail_queued.json", Status.queued),
        ("detail_running.json", Status.running),
        ("detail_postprocessing.json", Status.running),
        ("detail_task_error_interim.json", Status.running),
        ("detail_succeeded.json", Status.succeeded),
        ("detail_succeeded_no_pexit.json", Status.succeeded),
        ("detail_failed.json", Status.failed),
        ("detail_cancelled.json", Status.cancelled),
    ],
)
def test_recorded_details(fixture: str, expected: Status) -> None:
    ut = UpstreamTask.from_wire(json.loads((FIXTURES / fixture).read_text())["tasklist"][0])
    assert (
        observe(ut.status, ut.pexit, ut.debug_error, has_outputs=bool(ut.outputs)).status
        == expected
    )
