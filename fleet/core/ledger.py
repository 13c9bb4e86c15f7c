"""The scheduler's bookkeeping, with no I/O: tasks, jobs, admission, retries, requeues.

Every method takes ``now`` and returns the *effects* the I/O shell must carry out (publish a record,
purge queued work, broadcast a cancel). The shell performs them, waits for the server's acks, and
only then acknowledges the input that caused them, so an effect is never lost: at worst it is
repeated after a crash, and every method here is idempotent for repeated inputs (a task's attempt
number and its terminal states make duplicates harmless).

Admission is a chain of :class:`AdmissionPolicy` objects; today it holds the retry delay, and the
rate limits, quotas and dependencies of later milestones slot in as further policies.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from broker import names
from fleet.core import retry
from fleet.core.liveness import WorkerView
from fleet.core.records import (
    CancelRequest,
    DeadLetter,
    DoneReport,
    JobRecord,
    JobSpec,
    Record,
    StartReport,
    TaskEnvelope,
    TaskEvent,
)
from fleet.core.states import TERMINAL, TaskState, can_move

log = logging.getLogger("fleet.scheduler")


DEAD_LETTER_RAW_LIMIT = 64 * 1024
"""Bytes of the offending input kept in a dead letter."""


def task_key(job_id: str, task_id: str) -> str:
    """Tasks are identified by (job, task); this is the one string form of that pair."""
    return f"{job_id}/{task_id}"


def attempt_id(job_id: str, task_id: str, attempt: int) -> str:
    """The Nats-Msg-Id of one attempt of one task (de-duplicates repeated publishes)."""
    return f"{job_id}/{task_id}:{attempt}"


# ---- effects --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Publish:
    """Publish ``record`` to a JetStream subject (with a de-duplication id when given)."""

    subject: str
    record: Record
    msg_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """Publish on core NATS (no persistence): live control messages to workers."""

    subject: str
    record: Record


@dataclasses.dataclass(frozen=True)
class Purge:
    """Remove queued work matching ``subject`` from the task stream."""

    subject: str


Effect = Publish | Broadcast | Purge


# ---- admission ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Admit:
    pass


@dataclasses.dataclass(frozen=True)
class Defer:
    """Not yet: ask again after ``delay_s`` (the shell NAKs the intake message with that delay)."""

    delay_s: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Reject:
    reason: str


Decision = Admit | Defer | Reject


class AdmissionPolicy(Protocol):
    def decide(self, env: TaskEnvelope, now: float) -> Decision: ...


class NotBefore:
    """Holds a retry until its backoff has passed."""

    def decide(self, env: TaskEnvelope, now: float) -> Decision:
        if env.not_before is not None and env.not_before > now:
            return Defer(env.not_before - now, "retry backoff")
        return Admit()


# ---- state ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskEntry:
    task_id: str
    job_id: str
    state: TaskState | None = None
    attempt: int = 1
    delivery: int = 0
    worker: str | None = None
    queue: str = "default"


@dataclasses.dataclass
class JobStats:
    job_id: str
    created_at: float
    name: str = ""
    tenant: str = "default"
    queue: str = "default"
    total: int | None = None
    counts: dict[TaskState, int] = dataclasses.field(default_factory=dict)
    task_ids: set[str] = dataclasses.field(default_factory=set)
    retries: int = 0
    requeues: int = 0
    cancelled: bool = False
    finished_at: float | None = None
    updated_at: float = 0.0

    def record(self) -> JobRecord:
        return JobRecord(
            job_id=self.job_id,
            name=self.name,
            tenant=self.tenant,
            queue=self.queue,
            total=self.total,
            submitted=len(self.task_ids),
            counts={str(s): n for s, n in sorted(self.counts.items()) if n},
            retries=self.retries,
            requeues=self.requeues,
            created_at=self.created_at,
            updated_at=self.updated_at,
            finished_at=self.finished_at,
            cancelled=self.cancelled,
        )

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in TERMINAL)


class Ledger:
    def __init__(
        self,
        policies: Sequence[AdmissionPolicy] = (NotBefore(),),
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policies = list(policies)
        self.rand = rand
        self.tasks: dict[str, TaskEntry] = {}
        self.jobs: dict[str, JobStats] = {}
        self.dirty: set[str] = set()
        self._by_worker: dict[str, set[str]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def job(self, job_id: str, now: float) -> JobStats:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobStats(job_id=job_id, created_at=now, updated_at=now)
            self.dirty.add(job_id)
        return job

    def _entry(self, job_id: str, task_id: str, now: float) -> TaskEntry:
        key = task_key(job_id, task_id)
        entry = self.tasks.get(key)
        if entry is None:
            entry = self.tasks[key] = TaskEntry(task_id=task_id, job_id=job_id)
            self.job(job_id, now).task_ids.add(task_id)
        return entry

    def _move(
        self,
        entry: TaskEntry,
        dst: TaskState,
        now: float,
        *,
        reason: str | None = None,
        worker: str | None = None,
    ) -> list[Effect]:
        src = entry.state
        if not can_move(src, dst):
            log.debug("ignoring %s -> %s for %s", src, dst, entry.task_id)
            return []
        job = self.job(entry.job_id, now)
        if src is not None:
            job.counts[src] = job.counts.get(src, 0) - 1
        job.counts[dst] = job.counts.get(dst, 0) + 1
        entry.state = dst
        if entry.worker and dst != TaskState.RUNNING:
            self._by_worker.get(entry.worker, set()).discard(task_key(entry.job_id, entry.task_id))
            entry.worker = None
        if dst == TaskState.RUNNING and worker:
            entry.worker = worker
            self._by_worker.setdefault(worker, set()).add(task_key(entry.job_id, entry.task_id))
        job.updated_at = now
        self._check_finished(job, now)
        self.dirty.add(job.job_id)
        event = TaskEvent(
            kind="state",
            job_id=entry.job_id,
            task_id=entry.task_id,
            at=now,
            state=dst,
            attempt=entry.attempt,
            worker_id=worker,
            reason=reason,
        )
        return [Publish(names.event_subject(entry.job_id, entry.task_id, names.EVENT_STATE), event)]

    def _check_finished(self, job: JobStats, now: float) -> None:
        complete = job.total is not None and job.done >= job.total and len(job.task_ids) >= job.total
        if complete or (job.cancelled and job.done >= len(job.task_ids)):
            job.finished_at = job.finished_at or now
        else:
            job.finished_at = None

    # -- inputs ------------------------------------------------------------------------------------
    def declare(self, spec: JobSpec, now: float) -> list[Effect]:
        job = self.job(spec.job_id, now)
        job.name, job.tenant, job.queue = spec.name, spec.tenant, spec.queue
        job.total = spec.total
        job.created_at = min(job.created_at, spec.created_at)
        self._check_finished(job, now)
        self.dirty.add(job.job_id)
        return []

    def admit(self, env: TaskEnvelope, now: float) -> tuple[Decision, list[Effect]]:
        entry = self.tasks.get(task_key(env.job_id, env.task_id))
        job = self.job(env.job_id, now)
        if entry is not None and entry.state is not None:
            is_due_retry = entry.state == TaskState.RETRYING and env.attempt > entry.attempt
            if not is_due_retry:
                return Admit(), []  # a duplicate or late submission: already handled
        if job.cancelled:
            entry = self._entry(env.job_id, env.task_id, now)
            return Admit(), self._move(entry, TaskState.CANCELLED, now, reason="job cancelled")
        for policy in self.policies:
            decision = policy.decide(env, now)
            if isinstance(decision, Defer):
                return decision, []
            if isinstance(decision, Reject):
                return decision, self.reject(env.job_id, env.task_id, decision.reason, now)
        entry = self._entry(env.job_id, env.task_id, now)
        if env.attempt != entry.attempt:
            entry.delivery = 0  # deliveries are counted per attempt
        entry.attempt, entry.queue = env.attempt, env.queue
        out = self._move(entry, TaskState.QUEUED, now, reason="retry" if env.attempt > 1 else None)
        if not out:
            return Admit(), []
        dispatch = env.model_copy(update={"not_before": None})
        subject = names.task_subject(env.queue, env.job_id, env.task_id)
        return Admit(), [
            Publish(subject, dispatch, msg_id=attempt_id(env.job_id, env.task_id, env.attempt)),
            *out,
        ]

    def reject(self, job_id: str, task_id: str, reason: str, now: float) -> list[Effect]:
        """Input that can never run: the task ends DEAD with the reason."""
        entry = self._entry(job_id, task_id, now)
        return self._move(entry, TaskState.DEAD, now, reason=reason)

    def started(self, report: StartReport, now: float) -> list[Effect]:
        out: list[Effect] = []
        for t in report.tasks:
            entry = self._entry(t.job_id, t.task_id, now)
            if entry.state in TERMINAL or t.attempt < entry.attempt:
                continue
            if entry.state == TaskState.RUNNING and t.delivery > entry.delivery:
                prev = entry.worker or "unknown worker"
                self.job(t.job_id, now).requeues += 1
                out += self._move(
                    entry, TaskState.QUEUED, now, reason=f"lease expired on {prev}; redelivered"
                )
            if entry.state is None:  # scheduler restarted without this task's history
                out += self._move(entry, TaskState.QUEUED, now)
            entry.delivery = max(entry.delivery, t.delivery)
            out += self._move(entry, TaskState.RUNNING, now, worker=report.worker_id)
        return out

    def done(self, report: DoneReport, now: float) -> tuple[list[Effect], TaskEnvelope | None]:
        """Record an attempt's outcome; returns the effects and the retry envelope, if any."""
        entry = self._entry(report.job_id, report.task_id, now)
        if entry.state in TERMINAL or report.attempt < entry.attempt:
            return [], None
        if entry.state == TaskState.RETRYING:  # this attempt's outcome is already recorded
            return [], None
        out: list[Effect] = []
        if entry.state != TaskState.RUNNING:
            if entry.state is None:
                out += self._move(entry, TaskState.QUEUED, now)
            out += self._move(entry, TaskState.RUNNING, now, worker=report.worker_id)
        if report.outcome == "succeeded":
            return out + self._move(entry, TaskState.SUCCEEDED, now), None
        if report.outcome == "cancelled":
            return out + self._move(entry, TaskState.CANCELLED, now, reason="cancelled while running"), None
        err = report.error
        reason = f"{err.type}: {err.message}" if err else "failed"
        env = report.envelope
        if env is None or not retry.should_retry(env.retry, report.attempt, err.retryable if err else True):
            return out + self._move(entry, TaskState.FAILED, now, reason=reason), None
        delay = retry.backoff_delay(env.retry, report.attempt, self.rand)
        if err is not None and err.retry_after_s is not None:
            delay = err.retry_after_s
        nxt = env.model_copy(update={"attempt": report.attempt + 1, "not_before": now + delay})
        self.job(report.job_id, now).retries += 1
        out += self._move(entry, TaskState.RETRYING, now, reason=f"{reason} (retry in {delay:.1f}s)")
        retry_id = "retry:" + attempt_id(nxt.job_id, nxt.task_id, nxt.attempt)
        out.append(Publish(names.intake_retry(nxt.job_id, nxt.task_id), nxt, msg_id=retry_id))
        return out, nxt

    def worker_lost(self, view: WorkerView, now: float) -> list[Effect]:
        out: list[Effect] = []
        held = self._by_worker.pop(view.worker_id, set()) | set(view.tasks)
        for key in sorted(held):
            entry = self.tasks.get(key)
            if (
                entry is None
                or entry.state != TaskState.RUNNING
                or entry.worker not in (view.worker_id, None)
            ):
                continue
            self.job(entry.job_id, now).requeues += 1
            reason = f"lease lost: worker {view.worker_id} missed heartbeats"
            out += self._move(entry, TaskState.QUEUED, now, reason=reason)
        return out

    def cancel(self, req: CancelRequest, now: float) -> list[Effect]:
        job = self.job(req.job_id, now)
        if req.task_id is not None and task_key(req.job_id, req.task_id) not in self.tasks:
            log.warning("cancel of unknown task %s/%s ignored", req.job_id, req.task_id)
            return []
        targets = [req.task_id] if req.task_id else sorted(job.task_ids)
        out: list[Effect] = []
        if req.task_id is None:
            job.cancelled = True
            out.append(Purge(names.job_tasks_filter(req.job_id)))
            out.append(Broadcast(names.cancel_subject(req.job_id), req))
        for task_id in targets:
            entry = self._entry(req.job_id, task_id, now)
            out += self._move(entry, TaskState.CANCELLED, now, reason=req.reason)
        if req.task_id is not None:
            queue = self.tasks[task_key(req.job_id, req.task_id)].queue
            out.append(Purge(names.task_subject(queue, req.job_id, req.task_id)))
            out.append(Broadcast(names.cancel_subject(req.job_id), req))
        self._check_finished(job, now)
        self.dirty.add(job.job_id)
        return out

    def dead_letter(self, origin: str, subject: str, reason: str, raw: bytes, now: float) -> list[Effect]:
        """Record undecodable input; if the subject names a task, that task ends DEAD."""
        job_id, task_id = names.task_of(subject)
        raw = raw[:DEAD_LETTER_RAW_LIMIT]  # the letter itself must fit under max_payload
        letter = DeadLetter(
            origin=origin, subject=subject, reason=reason, at=now, job_id=job_id, task_id=task_id, raw=raw
        )
        out: list[Effect] = [Publish(names.dlq_subject(origin), letter)]
        if job_id and task_id and task_key(job_id, task_id) not in self.tasks:
            out += self.reject(job_id, task_id, reason, now)  # never admitted: it can never run
        return out

    # -- recovery and housekeeping -----------------------------------------------------------------
    def restore_job(self, record: JobRecord) -> None:
        job = self.job(record.job_id, record.created_at)
        job.name, job.tenant, job.queue, job.total = record.name, record.tenant, record.queue, record.total
        job.retries, job.requeues, job.cancelled = record.retries, record.requeues, record.cancelled
        job.finished_at, job.updated_at = record.finished_at, record.updated_at

    def restore_task(self, event: TaskEvent) -> None:
        """Replay the last known state of one task (from the event stream) after a restart."""
        if event.state is None:
            return
        entry = self._entry(event.job_id, event.task_id, event.at)
        job = self.job(event.job_id, event.at)
        if entry.state is not None:
            job.counts[entry.state] -= 1
        entry.state = event.state
        entry.attempt = event.attempt or 1
        job.counts[event.state] = job.counts.get(event.state, 0) + 1
        if event.state == TaskState.RUNNING and event.worker_id:
            entry.worker = event.worker_id
            self._by_worker.setdefault(event.worker_id, set()).add(task_key(entry.job_id, entry.task_id))

    def take_dirty(self) -> list[JobRecord]:
        dirty, self.dirty = self.dirty, set()
        return [self.jobs[j].record() for j in sorted(dirty) if j in self.jobs]

    def prune(self, now: float, keep_s: float) -> int:
        """Forget tasks of jobs finished more than ``keep_s`` ago (their history stays in the streams)."""
        gone = [j for j in self.jobs.values() if j.finished_at is not None and now - j.finished_at > keep_s]
        for job in gone:
            for task_id in job.task_ids:
                self.tasks.pop(task_key(job.job_id, task_id), None)
            del self.jobs[job.job_id]
        return len(gone)
