"""What the ledger asks its I/O shell to do. Pure data.

The shell carries effects out in three phases, each waited for before the next, and acknowledges
the inputs that caused them only after the last (docs/architecture.md, "crash safety"):

1. **before state**: :class:`Dispatch`, :class:`SaveResult`, :class:`Publish` (dead letters). The
   shell reports each dispatch's stream sequence back to the ledger (``Ledger.dispatched``).
2. **state**: every task whose record changed is written (``Ledger.take_states``), then job records.
3. **after state**: :class:`DeleteDispatch`, :class:`Purge`, :class:`Broadcast`, :class:`Archive`.

A failed effect is retried (every effect is idempotent: dispatches and records carry
de-duplication ids, deletes and purges of what is gone are no-ops), so the ledger may commit its
in-memory state first: what it decided is never lost, at worst repeated.
"""

from __future__ import annotations

import dataclasses

from fleet.core.records import Record, TaskEnvelope


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Put one attempt of a task on its queue as a new message."""

    job_id: str
    task_id: str
    queue: str
    attempt: int
    dispatch: int
    intake_seq: int | None
    envelope: TaskEnvelope | None = None
    """The envelope when the shell has it at hand (admission); else read from FLEET_INTAKE."""


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """Copy the accepted report (its raw bytes) to the task's result subject."""

    job_id: str
    task_id: str
    attempt: int
    raw: bytes


@dataclasses.dataclass(frozen=True)
class Publish:
    """Store ``record`` on a JetStream subject (dead letters)."""

    subject: str
    record: Record
    msg_id: str | None = None


@dataclasses.dataclass(frozen=True)
class DeleteDispatch:
    """End an old delivery: remove its message from FLEET_TASKS (a zombie's ack then hits nothing)."""

    seq: int


@dataclasses.dataclass(frozen=True)
class Purge:
    """Remove messages matching ``subject`` from ``stream``."""

    stream: str
    subject: str


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """Publish on core NATS (no persistence): a fast hint to workers, repeated by heartbeat fences."""

    subject: str
    record: Record


@dataclasses.dataclass(frozen=True)
class Archive:
    """Remove everything a finished job left (records, inputs, results, events, blobs), then its
    job record; the shell calls ``Ledger.archived`` when done."""

    job_id: str
    blobs: tuple[str, ...] = ()


Effect = Dispatch | SaveResult | Publish | DeleteDispatch | Purge | Broadcast | Archive
BEFORE_STATE = (Dispatch, SaveResult, Publish)
