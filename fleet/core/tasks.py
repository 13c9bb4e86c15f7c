"""One task as the scheduler tracks it, and its state of record. Pure."""

from __future__ import annotations

import dataclasses

from fleet.core.failures import Counters, FailureClass
from fleet.core.records import RetryPolicy, TaskRecord
from fleet.core.states import TaskState

DEFAULT_RETRY = RetryPolicy()
_POLICIES: dict[RetryPolicy, RetryPolicy] = {DEFAULT_RETRY: DEFAULT_RETRY}


def intern_policy(policy: RetryPolicy | None) -> RetryPolicy:
    """One shared object per distinct policy (a million tasks of a sweep share one)."""
    if policy is None:
        return DEFAULT_RETRY
    return _POLICIES.setdefault(policy, policy)


@dataclasses.dataclass(slots=True)
class TaskEntry:
    job_id: str
    task_id: str
    state: TaskState | None = None
    queue: str = "default"
    retry: RetryPolicy = DEFAULT_RETRY
    counters: Counters = dataclasses.field(default_factory=Counters)
    dispatch: int = 0
    pending: bool = False
    """A dispatch is on its way: its stream sequence is not known yet (``seq`` is the previous one)."""
    seq: int | None = None
    token: int | None = None
    worker: str | None = None
    reason: str | None = None
    failure: FailureClass | None = None
    not_before: float | None = None
    intake_seq: int | None = None
    blobs: tuple[str, ...] = ()
    rev: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.task_id)

    @property
    def attempt(self) -> int:
        return self.counters.attempt

    def record(self, now: float) -> TaskRecord:
        """The next revision of this task's state of record."""
        assert self.state is not None
        self.rev += 1
        c = self.counters
        return TaskRecord(
            job_id=self.job_id,
            task_id=self.task_id,
            state=self.state,
            rev=self.rev,
            at=now,
            queue=self.queue,
            attempt=c.attempt,
            dispatch=self.dispatch,
            seq=self.seq,
            token=self.token,
            worker_id=self.worker,
            reason=self.reason,
            failure=self.failure,
            lost=c.lost,
            infra=c.infra,
            preempted=c.preempted,
            not_before=self.not_before,
            intake_seq=self.intake_seq,
            blobs=list(self.blobs),
            retry=None if self.retry == DEFAULT_RETRY else self.retry,
        )

    @classmethod
    def from_record(cls, r: TaskRecord) -> TaskEntry:
        return cls(
            job_id=r.job_id,
            task_id=r.task_id,
            state=r.state,
            queue=r.queue,
            retry=intern_policy(r.retry),
            counters=Counters(attempt=r.attempt, lost=r.lost, infra=r.infra, preempted=r.preempted),
            dispatch=r.dispatch,
            seq=r.seq,
            token=r.token,
            worker=r.worker_id,
            reason=r.reason,
            failure=r.failure,
            not_before=r.not_before,
            intake_seq=r.intake_seq,
            blobs=tuple(r.blobs),
            rev=r.rev,
        )
