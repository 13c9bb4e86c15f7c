"""The task state machine: every state, every legal move, in one place.

::

                 +----------------- cancel ------------------+
                 |                                           v
    (submit) -> QUEUED -> DISPATCHED -> RUNNING -> SUCCEEDED  CANCELLED
                 ^  ^                    |  \\
                 |  |                    |   +-> FAILED  (attempt failed, no retry left or not retryable)
                 |  |                    |   +-> DEAD    (poison: rejected input, lease lost too often)
                 |  +---- lease lost (worker died; requeued) -+
                 |                       v
                 +---------------- RETRYING (attempt failed, waits out its backoff)

QUEUED tasks wait in the scheduler's waiting room (``fleet.policy.room``), which releases them just
in time into the work queue: they are then DISPATCHED until a worker reports their start.

A submission the scheduler cannot admit (bad fields, unknown encoding) goes straight to DEAD with a
dead-letter record. Terminal states never change again, with one exception: an operator's explicit
retry request (``fleet retry``, ``fleet dlq replay``) may reopen FAILED and DEAD tasks
(:data:`REOPEN`); no input from a worker or a client's submission can.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    """Admitted; waiting in the scheduler's waiting room (the job record says why)."""
    DISPATCHED = "dispatched"
    """Released into the work queue for the next free worker; not started yet."""
    RUNNING = "running"
    """Held by a worker under a lease that its heartbeats keep alive."""
    RETRYING = "retrying"
    """An attempt failed; the next attempt is scheduled after a backoff."""
    SUCCEEDED = "succeeded"
    """The handler returned; the result is stored."""
    FAILED = "failed"
    """The last attempt failed and the retry policy allows no more."""
    DEAD = "dead"
    """Never runnable: rejected at admission or poison; a dead-letter record says why."""
    CANCELLED = "cancelled"
    """Cancelled by a user before it finished."""


TERMINAL: frozenset[TaskState] = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DEAD, TaskState.CANCELLED}
)

ACTIVE: frozenset[TaskState] = frozenset({TaskState.DISPATCHED, TaskState.RUNNING})
"""Tasks that hold (or are about to hold) a worker slot: what quotas and the runway count."""
WAITING: frozenset[TaskState] = frozenset({TaskState.QUEUED, TaskState.RETRYING})
"""Tasks that are pending (what ``max_pending`` counts)."""

TRANSITIONS: dict[TaskState | None, frozenset[TaskState]] = {
    None: frozenset({TaskState.QUEUED, TaskState.DEAD, TaskState.CANCELLED}),
    TaskState.QUEUED: frozenset(
        # RUNNING: the start of a dispatch whose record a crash lost (first start wins)
        {TaskState.DISPATCHED, TaskState.RUNNING, TaskState.CANCELLED, TaskState.DEAD}
    ),
    TaskState.DISPATCHED: frozenset(
        {TaskState.RUNNING, TaskState.QUEUED, TaskState.CANCELLED, TaskState.DEAD}
    ),
    TaskState.RUNNING: frozenset(
        {
            TaskState.SUCCEEDED,
            TaskState.FAILED,
            TaskState.RETRYING,
            TaskState.QUEUED,  # lease lost: requeued for another worker
            TaskState.CANCELLED,
            TaskState.DEAD,
        }
    ),
    TaskState.RETRYING: frozenset({TaskState.QUEUED, TaskState.CANCELLED, TaskState.DEAD}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.DEAD: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


REOPEN: dict[TaskState, frozenset[TaskState]] = {
    TaskState.FAILED: frozenset({TaskState.QUEUED}),
    TaskState.DEAD: frozenset({TaskState.QUEUED}),
}
"""Moves out of a terminal state, allowed only for an operator's retry request."""


class IllegalTransition(ValueError):
    """A move the state machine does not allow."""


def can_move(src: TaskState | None, dst: TaskState, *, reopen: bool = False) -> bool:
    if reopen and src is not None and dst in REOPEN.get(src, frozenset()):
        return True
    return dst in TRANSITIONS[src]


def check_move(src: TaskState | None, dst: TaskState) -> TaskState:
    if not can_move(src, dst):
        raise IllegalTransition(f"task cannot move from {src or 'new'} to {dst}")
    return dst
