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
"""

from __future__ import annotations

BASE = 1000


def make(seq: int, delivery: int) -> int:
    return seq * BASE + max(1, min(delivery, BASE - 1))


def seq_of(token: int) -> int:
    return token // BASE


def delivery_of(token: int) -> int:
    return token % BASE


def describe(token: int | None) -> str:
    return "none" if token is None else f"{seq_of(token)}.{delivery_of(token)}"
