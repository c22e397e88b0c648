"""``app.models.detached``: an ORM object filled straight into its dict (a claimed task's
snapshot, a submit's task and first attempt) reads, changes and serialises as one made
by the constructor, refuses a name the constructor refuses, and is in no session."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect

from app.models import Attempt, Task, detached
from app.schemas import task_out

NOW = datetime(2026, 12, 7, 21, 0, tzinfo=UTC)


def _values() -> dict[str, object]:
    return dict(
        id="tsk_01",
        client="alpha",
        model="wiro/professional-headshot",
        status="pending",
        status_rank=0,
        input={"inputImageUrl": "https://example.com/me.jpg"},
        metadata_={"user_id": "u_1"},
        webhook_url=None,
        idempotency_key=None,
        request_hash="h",
        attempt=0,
        outputs=[],
        created_at=NOW,
        updated_at=NOW,
        deadline_at=NOW,
        next_check_at=NOW,
        lease_owner="owner",
        lease_until=NOW,
        retries=0,
        traceparent=None,
    )


def test_a_detached_task_reads_and_serialises_as_a_constructed_one() -> None:
    made, built = detached(Task, _values()), Task(**_values())
    assert type(made) is Task
    for key in Task.__mapper__.attrs.keys():  # set or not, each reads the same
        assert getattr(made, key) == getattr(built, key), key
    assert task_out(made).model_dump() == task_out(built).model_dump()
    made.attempt, made.status = 1, "queued"  # instrumented sets still work
    assert (made.attempt, made.status) == (1, "queued")
    assert made.__dict__["attempt"] == 1


def test_a_detached_object_is_transient_and_in_no_session() -> None:
    for made in (
        detached(Task, _values()),
        detached(Attempt, dict(id=7, task_id="tsk_01", number=1, outcome="sent")),
    ):
        state = inspect(made)
        assert state.transient and state.session is None


def test_a_name_that_is_not_an_attribute_is_refused_as_the_constructor_refuses_it() -> None:
    bad = {**_values(), "upstream_id": "2221"}  # a misspelt ``upstream_task_id``
    with pytest.raises(TypeError):
        Task(**bad)
    with pytest.raises(TypeError):
        detached(Task, bad)
    assert detached(Task, _values()).id == "tsk_01"  # the good names alone pass
