"""One job as the scheduler tracks it: its tasks, counts by state, and when it finished. Pure."""

from __future__ import annotations

import dataclasses

from fleet.core.records import JobRecord, JobSpec
from fleet.core.states import TERMINAL, TaskState
from fleet.core.tasks import TaskEntry


@dataclasses.dataclass
class JobStats:
    job_id: str
    created_at: float
    name: str = ""
    tenant: str = "default"
    queue: str = "default"
    total: int | None = None
    declared: bool = False
    tasks: dict[str, TaskEntry] = dataclasses.field(default_factory=dict)
    pruned: bool = False
    """Its task entries were dropped from memory (finished long ago); counts and records remain."""
    submitted: int = 0
    counts: dict[TaskState, int] = dataclasses.field(default_factory=dict)
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    retries: int = 0
    requeues: int = 0
    stale_reports: int = 0
    cancelled: bool = False
    finished_at: float | None = None
    updated_at: float = 0.0
    blobs: set[str] = dataclasses.field(default_factory=set)
    archiving: bool = False
    retried_at: float | None = None
    qos: str | None = None
    project: str | None = None
    priority: int | None = None
    """Set by ``fleet prioritize`` for the whole job: overrides its tasks' own priorities."""
    waiting: str | None = None
    """Why its queued tasks wait (``fleet.policy.room``), or None."""

    def apply_spec(self, spec: JobSpec) -> None:
        self.name, self.tenant, self.queue = spec.name, spec.tenant, spec.queue
        self.total, self.declared = spec.total, True
        self.qos, self.project = spec.qos or self.qos, spec.project or self.project
        self.created_at = min(self.created_at, spec.created_at)

    def apply_record(self, r: JobRecord) -> None:
        """Restore what only the job record knows (counts come from the task records)."""
        self.name, self.tenant, self.queue, self.total = r.name, r.tenant, r.queue, r.total
        self.declared = r.total is not None or self.declared
        self.retries, self.requeues, self.stale_reports = r.retries, r.requeues, r.stale_reports
        self.cancelled, self.finished_at, self.updated_at = r.cancelled, r.finished_at, r.updated_at
        self.created_at, self.retried_at = r.created_at, r.retried_at
        self.waiting, self.priority, self.qos, self.project = r.waiting, r.priority, r.qos, r.project

    def count(self, src: TaskState | None, dst: TaskState | None) -> None:
        if src is not None:
            self.counts[src] = self.counts.get(src, 0) - 1
        if dst is not None:
            self.counts[dst] = self.counts.get(dst, 0) + 1

    def count_failure(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self.failures[old] = self.failures.get(old, 0) - 1
        if new is not None:
            self.failures[new] = self.failures.get(new, 0) + 1

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in TERMINAL)

    def check_finished(self, now: float) -> bool:
        """Set or clear ``finished_at``; True if it changed.

        A job with a declared total finishes when that many tasks are terminal. One whose total is
        unknown finishes only through :meth:`settle` (idle, every task terminal)."""
        complete = self.total is not None and self.done >= self.submitted >= self.total
        all_in = self.total is not None and self.submitted >= self.total
        settled = (
            self.finished_at is not None
            and self.done >= self.submitted
            and (self.total is None or self.cancelled)
        )
        finished = complete or settled or (self.cancelled and all_in and self.done >= self.submitted)
        before = self.finished_at
        if finished:
            self.finished_at = self.finished_at or now
        else:
            self.finished_at = None
        return before != self.finished_at

    def settle(self, now: float, idle_s: float) -> bool:
        """A job whose total is unknown (or a cancelled job whose client never sent the rest), idle
        for ``idle_s`` with every task submitted so far terminal, is finished, so it is archived in
        time instead of staying in memory for ever; a later task reopens it."""
        if (self.total is not None and not self.cancelled) or self.finished_at is not None:
            return False
        if self.done < self.submitted or now - self.updated_at < idle_s:
            return False
        self.finished_at = now
        return True

    def record(self) -> JobRecord:
        return JobRecord(
            job_id=self.job_id,
            name=self.name,
            tenant=self.tenant,
            queue=self.queue,
            total=self.total,
            submitted=self.submitted,
            counts={str(s): n for s, n in sorted(self.counts.items()) if n},
            failures={k: n for k, n in sorted(self.failures.items()) if n},
            retries=self.retries,
            requeues=self.requeues,
            stale_reports=self.stale_reports,
            created_at=self.created_at,
            updated_at=self.updated_at,
            finished_at=self.finished_at,
            cancelled=self.cancelled,
            retried_at=self.retried_at,
            waiting=self.waiting,
            priority=self.priority,
            qos=self.qos,
            project=self.project,
        )
