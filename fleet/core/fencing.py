"""Fencing tokens: which delivery of a task is its holder. Pure.

A task is put on the work queue as a new message for every dispatch (first run, retry, requeue),
so each dispatch has its own stream sequence in FLEET_TASKS; JetStream may also deliver one message
several times (when its lease lapses). The token of a delivery is::

    token = seq * BASE + min(delivery, BASE - 1)

so it grows with every new dispatch and every redelivery. Workers read it from the message's
metadata (no round trip) and pass it to handlers as ``ctx.token``; every report carries it.

The scheduler's rules (``fleet.core.ledger`` applies them):

1. The holder is the delivery with the highest token seen in a start report for the current
   dispatch. A start with a lower token, or of an older dispatch, changes nothing.
2. An outcome (success or failure) is accepted only from the holder, or from a newer delivery of
   the current dispatch whose start was not seen; at most one outcome is accepted per attempt, and
   nothing after a terminal state. Everything else is a *stale report*: counted, never applied.
3. A worker that lists a delivery it should not run in its heartbeat is told to stop (a *fence*).
   It acknowledges the message only when that cannot end a newer holder's lease: JetStream keys
   acks by stream sequence alone, so the old holder of a redelivered message must not ack it.
4. A lost task is requeued as a *new* message (a new sequence) and the old message is deleted, so
   a zombie's late ack or ``+WPI`` lands on a message that no longer exists.
5. First start wins: after a hard server crash JetStream may hand the same message out again with
   the same delivery count, so two workers hold one token; the first start seen holds the task and
   the other is fenced without an ack.

:func:`accepts`, :func:`fence` and :func:`holds` are these rules as code.
"""

from __future__ import annotations

from fleet.core.states import TERMINAL, TaskState
from fleet.core.tasks import TaskEntry

BASE = 1000


def make(seq: int, delivery: int) -> int:
    return seq * BASE + max(1, min(delivery, BASE - 1))


def seq_of(token: int) -> int:
    return token // BASE


def delivery_of(token: int) -> int:
    return token % BASE


def describe(token: int | None) -> str:
    return "none" if token is None else f"{seq_of(token)}.{delivery_of(token)}"


def accepts(entry: TaskEntry, token: int, attempt: int, worker: str) -> bool:
    """Rule 2: may the outcome of delivery ``token`` (from ``worker``) be applied to ``entry``?"""
    if entry.state not in (TaskState.DISPATCHED, TaskState.RUNNING) or attempt != entry.attempt:
        return False
    if entry.pending or entry.seq is None or seq_of(token) != entry.seq:
        return False  # another dispatch's delivery, or a new dispatch not yet stored
    if token == entry.token and entry.worker not in (None, worker):
        return False  # the same delivery twice (a server lost its consumer state): rule 5
    return token >= (entry.token or 0)


def fence(entry: TaskEntry | None, token: int, worker: str, *, job_pruned: bool) -> tuple[str, bool] | None:
    """Rules 3 and 5: ``(reason, ack)`` if ``worker``'s delivery ``token`` must stop, else None."""
    if entry is None:
        return ("job finished", True) if job_pruned else None
    seq = seq_of(token)
    if entry.state in TERMINAL:
        return ("cancelled" if entry.state == TaskState.CANCELLED else f"already {entry.state}", True)
    if entry.seq is not None and (seq < entry.seq or (entry.pending and seq == entry.seq)):
        return "superseded by a newer dispatch", True
    if entry.state == TaskState.QUEUED and entry.seq is not None and seq <= entry.seq:
        return "requeued", True  # its old message is deleted; the task waits for a new dispatch
    if entry.state == TaskState.RETRYING and entry.seq == seq:
        return "outcome already recorded", True
    held = entry.state == TaskState.RUNNING and entry.seq == seq and entry.token is not None
    if held and token < (entry.token or 0):
        return "lease lost to a newer delivery of the same message", False
    if held and token == entry.token and entry.worker not in (None, worker):
        return f"delivery held by {entry.worker}", False
    return None


def holds(entry: TaskEntry | None, token: int, worker: str) -> bool:
    """Is ``worker``'s delivery ``token`` the holder of record (what ``ctx.confirm()`` asks)?"""
    return (
        entry is not None
        and entry.state == TaskState.RUNNING
        and entry.token == token
        and entry.worker == worker
    )
