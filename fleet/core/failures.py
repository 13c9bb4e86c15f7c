"""Failure classes and the retry budget each one draws on: pure, no I/O.

Every failed delivery is classified by the worker (or, for a lost lease, by the scheduler), and the
class decides what happens next:

===========  ======================================================  ======================  =====================
class        meaning                                                 budget                  when spent
===========  ======================================================  ======================  =====================
error        the handler raised, or the command exited non-zero      ``max_attempts``        failed
timeout      the attempt ran past ``timeout_s``                       ``max_attempts``        failed
killed       its process was killed (a signal, the OOM killer)       ``max_attempts``        failed
lost         the lease was lost: worker died, hung or was cut off    ``max_lost_leases``     dead (poison)
preempted    the node was reclaimed (spot notice, drain)             ``max_preemptions``     failed
infra        network or storage failed around the task               ``max_infra``           failed
invalid      the input can never run (undecodable, no such handler)  none                    dead
rejected     refused by policy at admission (tenant's max_pending)   none                    dead
===========  ======================================================  ======================  =====================

Only the first three use up the application's attempts (and move to the next attempt number); a
lost lease, a preemption or an infrastructure failure runs the same attempt again.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal, Protocol


class FailureClass(enum.StrEnum):
    ERROR = "error"
    TIMEOUT = "timeout"
    KILLED = "killed"
    LOST = "lost"
    PREEMPTED = "preempted"
    INFRA = "infra"
    INVALID = "invalid"
    REJECTED = "rejected"


ATTEMPT_CLASSES = frozenset({FailureClass.ERROR, FailureClass.TIMEOUT, FailureClass.KILLED})


class Budgets(Protocol):
    @property
    def max_attempts(self) -> int: ...
    @property
    def max_lost_leases(self) -> int: ...
    @property
    def max_infra(self) -> int: ...
    @property
    def max_preemptions(self) -> int: ...


Action = Literal["retry", "requeue", "fail", "dead"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    action: Action
    """``retry``: next attempt after a backoff; ``requeue``: the same attempt again at once;
    ``fail`` / ``dead``: terminal."""
    reason: str


@dataclasses.dataclass
class Counters:
    """How often a task has failed in each budgeted way (the attempt number counts the rest)."""

    attempt: int = 1
    lost: int = 0
    infra: int = 0
    preempted: int = 0


def decide(budgets: Budgets, cls: FailureClass, c: Counters, *, retryable: bool = True) -> Verdict:
    """What to do after a failure of class ``cls``; ``c`` already counts this failure."""
    if cls == FailureClass.INVALID:
        return Verdict("dead", "invalid input: it can never run")
    if cls == FailureClass.REJECTED:
        return Verdict("dead", "refused by policy")
    if cls == FailureClass.LOST:
        if c.lost >= budgets.max_lost_leases:
            return Verdict("dead", f"poison: lost its lease {c.lost} times (limit {budgets.max_lost_leases})")
        return Verdict("requeue", f"lease lost ({c.lost} of {budgets.max_lost_leases})")
    if cls == FailureClass.PREEMPTED:
        if c.preempted >= budgets.max_preemptions:
            return Verdict("fail", f"preempted {c.preempted} times (limit {budgets.max_preemptions})")
        return Verdict("requeue", "preempted")
    if cls == FailureClass.INFRA:
        if c.infra >= budgets.max_infra:
            return Verdict("fail", f"{c.infra} infrastructure failures (limit {budgets.max_infra})")
        return Verdict("retry", f"infrastructure failure ({c.infra} of {budgets.max_infra})")
    if not retryable:
        return Verdict("fail", "not retryable")
    if c.attempt >= budgets.max_attempts:
        return Verdict("fail", f"attempt {c.attempt} of {budgets.max_attempts}")
    return Verdict("retry", f"attempt {c.attempt} of {budgets.max_attempts}")


def count(cls: FailureClass, c: Counters) -> None:
    """Add one failure of ``cls`` to the counters its budget uses."""
    if cls == FailureClass.LOST:
        c.lost += 1
    elif cls == FailureClass.PREEMPTED:
        c.preempted += 1
    elif cls == FailureClass.INFRA:
        c.infra += 1
