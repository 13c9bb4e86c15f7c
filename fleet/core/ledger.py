"""The scheduler's bookkeeping, with no I/O: tasks, jobs, fencing, retries, requeues, cancels.

Every method takes ``now`` and returns the *effects* (``fleet.core.effects``) the I/O shell must
carry out; changed task and job records are collected and taken by the shell with
:meth:`Ledger.take_states` and :meth:`Ledger.take_jobs`. The ledger commits in memory at once; the
shell retries every effect until it is stored and acknowledges an input only after its effects,
so a decision is never lost (a crash replays the unacknowledged inputs against the state of
record, and every effect is idempotent).

Fencing rules are in ``fleet.core.fencing``; failure classes and their budgets in
``fleet.core.failures``.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Iterable

from broker import names
from fleet.core import failures, fencing, retry
from fleet.core.effects import (
    Broadcast,
    DeleteDispatch,
    Effect,
    Publish,
    Purge,
    SaveResult,
)
from fleet.core.failures import FailureClass
from fleet.core.jobs import JobStats
from fleet.core.lifecycle import Lifecycle
from fleet.core.records import (
    BudgetNotice,
    CancelRequest,
    DeadLetter,
    DoneReport,
    Fence,
    Heartbeat,
    JobRecord,
    JobSpec,
    RetryRequest,
    StartReport,
    TaskEnvelope,
    TaskRecord,
)
from fleet.core.states import TERMINAL, TaskState, can_move
from fleet.core.tasks import TaskEntry, shape_of
from fleet.policy.budget import Notice, period_index

log = logging.getLogger("fleet.scheduler")

DEAD_LETTER_RAW_LIMIT = 64 * 1024
"""Bytes of the offending input kept in a dead letter."""
Key = tuple[str, str]


class Ledger(Lifecycle):
    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        super().__init__()
        self.rand = rand
        self.jobs: dict[str, JobStats] = {}
        self._by_worker: dict[str, set[Key]] = {}
        self._timers: list[tuple[float, str, str]] = []
        self._dirty_tasks: dict[Key, TaskEntry] = {}
        self._dirty_jobs: set[str] = set()

    # -- lookups ---------------------------------------------------------------------------------
    def job(self, job_id: str, now: float) -> JobStats:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobStats(job_id=job_id, created_at=now, updated_at=now)
            self._dirty_jobs.add(job_id)
        return job

    def task(self, job_id: str, task_id: str) -> TaskEntry | None:
        job = self.jobs.get(job_id)
        return job.tasks.get(task_id) if job is not None else None

    def held_by(self, worker_id: str) -> list[TaskEntry]:
        out = [self.task(j, t) for j, t in sorted(self._by_worker.get(worker_id, ()))]
        return [e for e in out if e is not None]

    def _new_entry(self, job: JobStats, task_id: str) -> TaskEntry:
        entry = job.tasks[task_id] = TaskEntry(job_id=job.job_id, task_id=task_id, queue=job.queue)
        job.submitted += 1
        return entry

    # -- the one place states change ---------------------------------------------------------------
    def _move(
        self, entry: TaskEntry, dst: TaskState, now: float, reason: str | None = None, *, reopen: bool = False
    ) -> bool:
        src = entry.state
        if not can_move(src, dst, reopen=reopen):
            log.debug("ignoring %s -> %s for %s/%s", src, dst, entry.job_id, entry.task_id)
            return False
        job = self.job(entry.job_id, now)
        job.count(src, dst)
        self._account(entry, src, dst, job, now)
        if entry.waiting:
            self._leave_room(entry, job, now)
        if src in (TaskState.FAILED, TaskState.DEAD):
            job.count_failure(entry.failure, None)
        if dst in (TaskState.FAILED, TaskState.DEAD):
            job.count_failure(None, entry.failure or FailureClass.INVALID)
        entry.state, entry.reason = dst, reason
        if dst != TaskState.RUNNING and entry.worker is not None:
            self._by_worker.get(entry.worker, set()).discard(entry.key)
            entry.worker = None
        if dst != TaskState.RETRYING:
            entry.not_before = None
        job.updated_at = now
        self._touch(entry, job, now)
        return True

    def _hold(self, entry: TaskEntry, worker: str, token: int) -> None:
        if entry.worker is not None and entry.worker != worker:
            self._by_worker.get(entry.worker, set()).discard(entry.key)
        entry.worker, entry.token = worker, token
        self._by_worker.setdefault(worker, set()).add(entry.key)

    def _touch(self, entry: TaskEntry, job: JobStats, now: float) -> None:
        self._dirty_tasks[entry.key] = entry
        job.check_finished(now)
        self._dirty_jobs.add(job.job_id)

    def add_blob(self, job_id: str, task_id: str, blob: str) -> None:
        """The shell found an offloaded payload in a dispatched envelope: deleted with the job."""
        entry = self.task(job_id, task_id)
        if entry is not None and blob not in entry.blobs:
            entry.blobs = (*entry.blobs, blob)
            self.jobs[job_id].blobs.add(blob)
            self._dirty_tasks[entry.key] = entry

    def dispatched(self, job_id: str, task_id: str, dispatch: int, seq: int) -> None:
        """The shell stored dispatch number ``dispatch`` as stream sequence ``seq``."""
        entry = self.task(job_id, task_id)
        if entry is not None and entry.dispatch == dispatch and entry.pending:
            entry.seq, entry.pending = seq, False
            self._dirty_tasks[entry.key] = entry

    def _arm(self, entry: TaskEntry, at: float) -> None:
        entry.not_before = at
        heapq.heappush(self._timers, (at, entry.job_id, entry.task_id))

    # -- inputs from clients ---------------------------------------------------------------------
    def declare(self, spec: JobSpec, now: float) -> list[Effect]:
        job = self.job(spec.job_id, now)
        job.apply_spec(spec)
        if job.job_id in self.room.jobs:
            self._rehome(job, now)  # its tasks came first: they now wait where the job says
        self._touch_job(job, now)
        return []

    def _touch_job(self, job: JobStats, now: float) -> None:
        job.updated_at = now
        job.check_finished(now)
        self._dirty_jobs.add(job.job_id)

    def admit(self, env: TaskEnvelope, now: float, intake_seq: int | None = None) -> list[Effect]:
        job = self.job(env.job_id, now)
        if env.task_id in job.tasks or (
            intake_seq is not None and self.room.contains(job.job_id, intake_seq)
        ):
            return []  # a duplicate or late submission: already handled
        if job.submitted == 0 and not job.declared:  # no declaration (yet): the task says
            job.tenant, job.queue = env.tenant, env.queue
            job.qos, job.project = env.qos or job.qos, env.project or job.project
        if env.payload.ref:
            job.blobs.add(names.blob_name(env.job_id, env.payload.ref))
        shape = shape_of(env)
        refused = None if job.cancelled else self._refusal(job, env)
        if intake_seq is not None and not job.cancelled and refused is None and not self._later(env, now):
            self._wait_new(job, env, intake_seq, shape, now)
            self._touch_job(job, now)
            return []
        entry = self._new_entry(job, env.task_id)
        entry.queue, entry.shape, entry.intake_seq = env.queue, shape, intake_seq
        entry.priority = self.band(job, env.priority)
        if env.payload.ref:
            entry.blobs = (names.blob_name(env.job_id, env.payload.ref),)
        if job.cancelled:
            self._move(entry, TaskState.CANCELLED, now, "job cancelled")
            return []
        if refused is not None:
            entry.failure = refused[0]
            self._move(entry, TaskState.DEAD, now, refused[1])
            return [self._letter(entry, refused[1], now)]
        if self._later(env, now):
            assert env.not_before is not None
            self._move(entry, TaskState.QUEUED, now, f"not before {env.not_before:.0f}")
            self._arm(entry, env.not_before)
            return []
        return self._enqueue(entry, now)

    @staticmethod
    def _later(env: TaskEnvelope, now: float) -> bool:
        return env.not_before is not None and env.not_before > now

    def _refusal(self, job: JobStats, env: TaskEnvelope) -> tuple[FailureClass, str] | None:
        if env.tenant != job.tenant:
            return FailureClass.INVALID, f"task tenant {env.tenant!r} differs from its job's {job.tenant!r}"
        blocked = self.gate.admit_block(job.tenant)
        if blocked is not None:
            return FailureClass.REJECTED, blocked
        never = self.gate.placement.never_fits(env.queue, env.resources)
        return (FailureClass.INVALID, never) if never is not None else None

    def reject(self, job_id: str, task_id: str, reason: str, now: float) -> list[Effect]:
        """Input that can never run: the task ends DEAD with the reason."""
        job = self.job(job_id, now)
        entry = job.tasks.get(task_id) or self._new_entry(job, task_id)
        if entry.state in TERMINAL:
            return []  # its outcome is final: the input is only dead-lettered
        entry.failure = FailureClass.INVALID
        self._move(entry, TaskState.DEAD, now, reason)
        return []

    def cancel(self, req: CancelRequest, now: float) -> list[Effect]:
        job = self.job(req.job_id, now)
        out: list[Effect] = [Broadcast(names.cancel_subject(req.job_id), req)]
        if req.task_id is None:
            job.cancelled = True
            self._take_all_new(job, now)
            targets: Iterable[TaskEntry] = list(job.tasks.values())
            out.append(Purge(names.TASKS_STREAM, names.job_tasks_filter(req.job_id)))
        elif job.pruned and req.task_id not in job.tasks:
            return out  # the job finished long ago: its tasks are all terminal
        else:
            entry = (
                job.tasks.get(req.task_id)
                or self._take_new(job, req.task_id, now)
                or self._new_entry(job, req.task_id)
            )
            targets = [entry]
            out.append(Purge(names.TASKS_STREAM, names.task_subject(entry.queue, req.job_id, req.task_id)))
        for entry in targets:
            self._move(entry, TaskState.CANCELLED, now, req.reason)
        self._touch_job(job, now)
        return out

    def retry_request(self, req: RetryRequest, now: float) -> list[Effect]:
        """Reopen a job's failed (and, if asked, dead) tasks for a fresh run of every budget."""
        job = self.jobs.get(req.job_id)
        if job is None or job.pruned:
            log.warning("retry of %s: job unknown or no longer in memory", req.job_id)
            return []
        if job.retried_at is not None and req.at <= job.retried_at:
            return []  # already applied (a redelivered or older request)
        job.retried_at = req.at
        states = {TaskState.FAILED} | ({TaskState.DEAD} if req.include_dead else set())
        wanted = set(req.task_ids) if req.task_ids else None
        out: list[Effect] = []
        for entry in list(job.tasks.values()):
            if entry.state not in states or (wanted is not None and entry.task_id not in wanted):
                continue
            if req.failures and (entry.failure or FailureClass.INVALID) not in req.failures:
                continue
            if entry.failure == FailureClass.INVALID and entry.intake_seq is None:
                continue  # never admitted: there is nothing to run
            c = entry.counters
            c.attempt, c.lost, c.infra, c.preempted = c.attempt + 1, 0, 0, 0
            self._move(entry, TaskState.QUEUED, now, f"retry requested ({req.request_id})", reopen=True)
            job.retries += 1
            out += self._enqueue(entry, now)
        self._touch_job(job, now)
        return out

    # -- inputs from workers ---------------------------------------------------------------------
    def started(self, report: StartReport, now: float) -> list[Effect]:
        out: list[Effect] = []
        for t in report.tasks:
            entry = self.task(t.job_id, t.task_id)
            if entry is None or entry.pending or entry.state in TERMINAL or entry.state == TaskState.RETRYING:
                continue  # fenced by the worker's next heartbeat (see heartbeat_fences)
            seq = fencing.seq_of(t.token)
            if entry.seq is not None and seq < entry.seq:
                continue  # an older dispatch
            if entry.state in (TaskState.QUEUED, TaskState.DISPATCHED):
                if entry.dispatch == 0:
                    continue  # not dispatched by us (yet): a stray message
                if entry.state == TaskState.QUEUED and entry.seq is not None and seq <= entry.seq:
                    continue  # an old dispatch of a requeued task: fenced by the next heartbeat
                entry.seq = seq
                self._hold(entry, report.worker_id, t.token)
                self._move(entry, TaskState.RUNNING, now)
            elif entry.state == TaskState.RUNNING and t.token > (entry.token or 0):
                # JetStream handed the same dispatch to someone else: the holder's lease lapsed
                out += self._lost(
                    entry,
                    now,
                    f"lease of {entry.worker} lapsed; redelivered",
                    keep=(report.worker_id, t.token),
                )
        return out

    def done(self, report: DoneReport, now: float, raw: bytes = b"") -> list[Effect]:
        entry = self.task(report.job_id, report.task_id)
        job = self.jobs.get(report.job_id)
        if (
            entry is None
            or job is None
            or not fencing.accepts(entry, report.token, report.attempt, report.worker_id)
        ):
            if job is not None and (entry is None or entry.token != report.token):
                job.stale_reports += 1
                self._dirty_jobs.add(job.job_id)
            return []
        if entry.state == TaskState.DISPATCHED:  # its start report was not seen (or lost)
            self._hold(entry, report.worker_id, report.token)
            self._move(entry, TaskState.RUNNING, now)
        entry.token = report.token
        notices = self.gate.ran(
            job.tenant, job.project or "default", entry.shape, report.finished_at - report.started_at, now
        )
        extra: list[Effect] = [self._notice(n) for n in notices]
        if report.result is not None and report.result.ref:
            blob = names.blob_name(report.job_id, report.result.ref)
            entry.blobs = (*entry.blobs, blob)
            job.blobs.add(blob)
        if report.outcome == "succeeded":
            self._move(entry, TaskState.SUCCEEDED, now)
            return [
                SaveResult(report.job_id, report.task_id, report.attempt, raw or report.to_wire()),
                *extra,
            ]
        if report.outcome == "cancelled":
            self._move(entry, TaskState.CANCELLED, now, "cancelled while running")
            return extra
        err = report.error
        cls = err.failure if err is not None else FailureClass.ERROR
        reason = f"{err.type}: {err.message}" if err is not None else "failed"
        out = self._failed(
            entry,
            cls,
            reason,
            now,
            retryable=err.retryable if err else True,
            delay=err.retry_after_s if err else None,
        )
        if entry.state in (TaskState.FAILED, TaskState.DEAD) and report.outcome == "failed":
            out.append(SaveResult(report.job_id, report.task_id, report.attempt, raw or report.to_wire()))
        return out + extra

    def _notice(self, n: Notice) -> Publish:
        log.warning("%s", n.message)
        record = BudgetNotice(
            tenant=n.tenant,
            resource=n.resource,
            used=n.used,
            limit=n.limit,
            threshold=n.threshold,
            held=n.held,
            at=n.at,
            message=n.message,
        )
        period = period_index(self.policy.tenant(n.tenant), n.at)
        return Publish(
            names.budget_notice_subject(n.tenant),
            record,
            names.msgid_notice(n.tenant, n.resource, n.threshold, period),
        )

    def _failed(
        self,
        entry: TaskEntry,
        cls: FailureClass,
        reason: str,
        now: float,
        *,
        retryable: bool = True,
        delay: float | None = None,
    ) -> list[Effect]:
        job = self.job(entry.job_id, now)
        entry.failure = cls
        failures.count(cls, entry.counters)
        verdict = failures.decide(entry.retry, cls, entry.counters, retryable=retryable)
        old_seq = entry.seq
        out: list[Effect] = []
        if verdict.action == "retry":
            wait = delay if delay is not None else retry.backoff_delay(entry.retry, entry.attempt, self.rand)
            if cls in failures.ATTEMPT_CLASSES:
                entry.counters.attempt += 1
            job.retries += 1
            self._move(entry, TaskState.RETRYING, now, f"{reason} [{cls}] (retry in {wait:.1f}s)")
            if wait <= 0:
                out += self._enqueue(entry, now)
            else:
                self._arm(entry, now + wait)
        elif verdict.action == "requeue":
            job.requeues += 1
            self._move(entry, TaskState.QUEUED, now, f"{reason} [{cls}]: {verdict.reason}")
            out += self._enqueue(entry, now)
        else:
            dst = TaskState.DEAD if verdict.action == "dead" else TaskState.FAILED
            self._move(entry, dst, now, f"{reason} [{cls}]: {verdict.reason}")
            if dst == TaskState.DEAD:
                out.append(self._letter(entry, f"{reason}: {verdict.reason}", now))
        if old_seq is not None and (entry.state == TaskState.QUEUED or cls == FailureClass.LOST):
            out.append(DeleteDispatch(old_seq))  # the old delivery ends here (a zombie's ack hits nothing)
        return out

    def _lost(
        self, entry: TaskEntry, now: float, reason: str, keep: tuple[str, int] | None = None
    ) -> list[Effect]:
        """The holder lost its lease. ``keep``: JetStream already gave the same message to a new
        holder, which keeps running it unless the task is now poison."""
        if keep is None:
            return self._failed(entry, FailureClass.LOST, reason, now)
        job = self.job(entry.job_id, now)
        entry.failure = FailureClass.LOST
        failures.count(FailureClass.LOST, entry.counters)
        verdict = failures.decide(entry.retry, FailureClass.LOST, entry.counters)
        if verdict.action == "dead":
            self._move(entry, TaskState.DEAD, now, f"{reason}: {verdict.reason}")
            out: list[Effect] = [self._letter(entry, verdict.reason, now)]
            return out + ([DeleteDispatch(entry.seq)] if entry.seq else [])
        job.requeues += 1
        self._hold(entry, *keep)
        entry.reason = f"{reason} ({verdict.reason})"
        self._touch(entry, job, now)
        return []

    def _letter(self, entry: TaskEntry, reason: str, now: float) -> Publish:
        letter = DeadLetter(
            origin="task",
            subject=names.state_subject(entry.job_id, entry.task_id),
            reason=reason,
            at=now,
            job_id=entry.job_id,
            task_id=entry.task_id,
            failure=entry.failure,
            attempt=entry.attempt,
        )
        return Publish(
            names.dlq_task_subject(entry.job_id, entry.task_id),
            letter,
            names.msgid_dead(entry.job_id, entry.task_id, entry.attempt, entry.dispatch),
        )

    def worker_lost(self, worker_id: str, now: float, why: str = "missed heartbeats") -> list[Effect]:
        out: list[Effect] = self._unplace(worker_id, now)
        for key in sorted(self._by_worker.pop(worker_id, set())):
            entry = self.task(*key)
            if entry is not None and entry.state == TaskState.RUNNING and entry.worker == worker_id:
                out += self._lost(entry, now, f"lease lost: worker {worker_id} {why}")
        return out

    def _unplace(self, worker_id: str, now: float) -> list[Effect]:
        """Tasks placed on a lost worker that it never started wait again (their message goes)."""
        out: list[Effect] = []
        for job in self.jobs.values():
            for entry in job.tasks.values():
                if entry.state == TaskState.DISPATCHED and entry.placed == worker_id:
                    seq = None if entry.pending else entry.seq
                    self._enqueue(entry, now, f"its worker {worker_id} was lost before it started")
                    if seq is not None:
                        out.append(DeleteDispatch(seq))
        return out

    def heartbeat_fences(self, hb: Heartbeat) -> list[Fence]:
        """Rule 3 of fleet.core.fencing: deliveries this worker must stop."""
        fences: list[Fence] = []
        for h in hb.held:
            job = self.jobs.get(h.job_id)
            entry = job.tasks.get(h.task_id) if job is not None else None
            verdict = fencing.fence(entry, h.token, hb.worker_id, job_pruned=job is not None and job.pruned)
            if verdict is not None:
                reason, ack = verdict
                fences.append(
                    Fence(job_id=h.job_id, task_id=h.task_id, token=h.token, reason=reason, ack=ack)
                )
        return fences

    def confirmed(self, hb: Heartbeat) -> list[int]:
        """Tokens in ``hb`` that the state of record shows held by this worker."""
        return [
            h.token for h in hb.held if fencing.holds(self.task(h.job_id, h.task_id), h.token, hb.worker_id)
        ]

    def is_pruned(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.pruned

    # -- time ------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Effect]:
        """Dispatch retries and delayed tasks that are due."""
        out: list[Effect] = []
        while self._timers and self._timers[0][0] <= now:
            at, job_id, task_id = heapq.heappop(self._timers)
            entry = self.task(job_id, task_id)
            if (
                entry is None
                or entry.not_before != at
                or entry.state not in (TaskState.RETRYING, TaskState.QUEUED)
            ):
                continue
            entry.not_before = None
            out += self._enqueue(entry, now)
        return out

    # -- records for the shell ---------------------------------------------------------------------
    def take_states(self, now: float, limit: int | None = None) -> list[TaskRecord]:
        """Records of changed tasks, each once, skipping dispatches still waiting for their seq."""
        out: list[TaskRecord] = []
        for key in list(self._dirty_tasks):
            entry = self._dirty_tasks[key]
            if entry.state == TaskState.DISPATCHED and entry.pending:
                continue  # the dispatch is written first (effects phase 1)
            del self._dirty_tasks[key]
            out.append(entry.record(now))
            if limit is not None and len(out) >= limit:
                break
        return out

    def take_jobs(self) -> list[JobRecord]:
        dirty, self._dirty_jobs = self._dirty_jobs, set()
        return [self.jobs[j].record() for j in sorted(dirty) if j in self.jobs]

    def dead_letter(self, origin: str, subject: str, reason: str, raw: bytes, now: float) -> list[Effect]:
        """Record undecodable input; if the subject names a task never admitted, that task ends DEAD."""
        job_id, task_id = names.task_of(subject)
        letter = DeadLetter(
            origin=origin,
            subject=subject,
            reason=reason,
            at=now,
            job_id=job_id,
            task_id=task_id,
            raw=raw[:DEAD_LETTER_RAW_LIMIT],
        )
        out: list[Effect] = [Publish(names.dlq_subject(origin), letter)]
        if origin == "intake" and job_id and task_id and self.task(job_id, task_id) is None:
            out += self.reject(job_id, task_id, reason, now)
        return out

    def _take_all_new(self, job: JobStats, now: float) -> None:
        """A cancelled job's new tasks leave the room as entries of their own (to be cancelled)."""
        new, entries = self.room.drop_job(job.job_id, now)
        for entry in entries:
            entry.waiting = False
        for task_id, seq in new:
            job.tasks[task_id] = TaskEntry(
                job_id=job.job_id, task_id=task_id, state=TaskState.QUEUED, queue=job.queue, intake_seq=seq
            )

    def holders(self) -> list[str]:
        return sorted(w for w, keys in self._by_worker.items() if keys)
