"""The task engine: the only code that writes task rows.

How a task moves (docs/architecture.md draws it):

1. ``submit`` (``_intake``) validates the request and, in one transaction, records the
   task as ``pending`` with its first event and, when a slot is free, its first attempt
   (``_dispatch.open_attempt``). Run is sent outside any transaction and its answer
   recorded (``_dispatch.send``): the task is ``queued`` and linked to its upstream task.
2. ``check`` (``_follow``) is the one unit of background work, run by whoever holds the
   task's lease (``_leases``; the task loop's claim returns the rows, so a check starts
   without a read): a pending task is dispatched along the same path, a submitted one is
   polled with ``Task/Detail`` and what Detail says is applied (``apply_detail``, the
   lease given back in the same write), a late one is stopped at its deadline.
3. Callbacks (``_callbacks``) only mark the task due; ``check`` then reads Detail.
4. ``cancel_task`` cancels locally while pending, else asks Wiro and waits for its word.

Every status change goes through ``_writes.transition``: conditional on the rank (statuses
only move forward, terminal ones never change), with exactly one event and one metric in
the same transaction. No transaction is held across an upstream call.
"""

from app.context import Ctx
from app.ids import id_time, new_task_id
from app.ids import sha256_hex as token_hash
from app.tasks._callbacks import accept_callback
from app.tasks._follow import apply_detail, cancel_task, check
from app.tasks._history import (
    decode_cursor,
    encode_cursor,
    get_task,
    insert_metadata,
    list_events,
    list_tasks,
    load_task,
    visible,
)
from app.tasks._intake import create_task, submit
from app.tasks._leases import Claimed, claim_due, claim_tasks, release_all, renew_leases

__all__ = [
    "Claimed",
    "Ctx",
    "accept_callback",
    "apply_detail",
    "cancel_task",
    "check",
    "claim_due",
    "claim_tasks",
    "create_task",
    "decode_cursor",
    "encode_cursor",
    "get_task",
    "id_time",
    "insert_metadata",
    "list_events",
    "list_tasks",
    "load_task",
    "new_task_id",
    "release_all",
    "renew_leases",
    "submit",
    "token_hash",
    "visible",
]
