"""Builders and a miniature I/O shell for the ledger tests (test_ledger*.py).

:class:`Shell` drives a :class:`fleet.core.ledger.Ledger` the way ``fleet.scheduler.apply`` does:
every ``Dispatch`` gets the next stream sequence fed back through ``Ledger.dispatched``, then the
changed task and job records are taken, as the shell writes them. Everything is kept for
inspection (effects, records), and :meth:`Shell.restart` rebuilds a fresh ledger from the records
written so far, the way ``fleet.scheduler.recovery`` does after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from fleet.core import fencing
from fleet.core.effects import DeleteDispatch, Dispatch, Effect, Publish, SaveResult
from fleet.core.failures import FailureClass
from fleet.core.ledger import Ledger
from fleet.core.records import (
    CancelRequest,
    DoneReport,
    ErrorInfo,
    Heartbeat,
    HeldTask,
    JobRecord,
    JobSpec,
    Payload,
    RetryPolicy,
    RetryRequest,
    StartedTask,
    StartReport,
    TaskEnvelope,
    TaskRecord,
)
from fleet.core.states import TaskState
from fleet.core.tasks import TaskEntry

T0 = 1_000_000.0
J = "j1"
Q, R, S = TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING
D = TaskState.DISPATCHED
OK, FAIL, DEAD, CXL = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DEAD, TaskState.CANCELLED
E = TypeVar("E")


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: backoff without spread


def policy(**kw: Any) -> RetryPolicy:
    return RetryPolicy(**{"backoff_s": 1.0, "multiplier": 2.0, "jitter": 0.0, **kw})


def env(
    task: str = "t1",
    job: str = J,
    *,
    queue: str = "default",
    retry: RetryPolicy | None = None,
    not_before: float | None = None,
    ref: str | None = None,
) -> TaskEnvelope:
    payload = Payload(size=1, ref=ref) if ref else Payload(size=1, data=b"\xc0")
    return TaskEnvelope(
        job_id=job,
        task_id=task,
        handler="pkg.mod:func",
        payload=payload,
        queue=queue,
        retry=retry or RetryPolicy(),
        created_at=T0,
        not_before=not_before,
    )


def start(worker: str, *tasks: tuple[str, int], job: str = J, attempt: int = 1) -> StartReport:
    """A start report for ``(task, token)`` pairs."""
    return StartReport(
        worker_id=worker,
        at=T0,
        tasks=[
            StartedTask(job_id=job, task_id=t, attempt=attempt, delivery=fencing.delivery_of(tok), token=tok)
            for t, tok in tasks
        ],
    )


def done(
    task: str,
    token: int,
    *,
    worker: str = "w1",
    job: str = J,
    attempt: int = 1,
    outcome: str = "succeeded",
    failure: FailureClass | None = None,
    retryable: bool = True,
    retry_after_s: float | None = None,
    result_ref: str | None = None,
) -> DoneReport:
    """A done report; a ``failure`` class makes it a failed one."""
    if failure is not None:
        outcome = "failed"
    error = (
        ErrorInfo(
            type="Boom",
            message="it broke",
            retryable=retryable,
            failure=failure or FailureClass.ERROR,
            retry_after_s=retry_after_s,
        )
        if outcome == "failed"
        else None
    )
    result = None
    if outcome == "succeeded":
        result = Payload(size=1, ref=result_ref) if result_ref else Payload(size=1, data=b"\x01")
    return DoneReport(
        job_id=job,
        task_id=task,
        attempt=attempt,
        delivery=fencing.delivery_of(token),
        token=token,
        worker_id=worker,
        outcome=outcome,
        result=result,
        error=error,
        started_at=T0,
        finished_at=T0,
    )


def heartbeat(worker: str, *held: tuple[str, int], job: str = J) -> Heartbeat:
    return Heartbeat(
        worker_id=worker,
        queue="default",
        host="h",
        pid=1,
        slots=4,
        busy=len(held),
        held=[HeldTask(job_id=job, task_id=t, token=tok) for t, tok in held],
        at=T0,
        interval_s=1.0,
    )


def cancel(job: str = J, task: str | None = None, reason: str = "cancelled by user") -> CancelRequest:
    return CancelRequest(job_id=job, task_id=task, reason=reason, at=T0)


def retry_req(job: str = J, request: str = "r1", at: float = T0, **kw: Any) -> RetryRequest:
    return RetryRequest(job_id=job, request_id=request, at=at, **kw)


def spec(job: str = J, total: int | None = None) -> JobSpec:
    return JobSpec(job_id=job, total=total, created_at=T0)


def only(effects: Sequence[Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


class Shell:
    """Feeds stream sequences back and collects every record, like the scheduler's applier."""

    def __init__(self, ledger: Ledger | None = None, *, seq: int = 100) -> None:
        self.ledger = ledger or Ledger(rand=no_jitter)
        self.seq = seq
        self.now = T0
        self.effects: list[Effect] = []
        self.records: list[TaskRecord] = []
        self.job_records: list[JobRecord] = []
        self.deleted: list[int] = []
        self.dispatches: list[tuple[Dispatch, int]] = []
        self.intake = 0
        self.envs: list[tuple[TaskEnvelope, int]] = []
        self.slots: dict[str, int] = {"default": 1000}
        """Free worker slots per queue the waiting room releases into after every input."""

    def apply(self, effects: list[Effect], now: float | None = None) -> list[Effect]:
        now = self.now if now is None else now
        effects = effects + self.ledger.release(now, self.slots)
        for eff in effects:
            if isinstance(eff, Dispatch):
                self.seq += 1
                self.dispatches.append((eff, self.seq))
                self.ledger.dispatched(eff.job_id, eff.task_id, eff.dispatch, self.seq)
            elif isinstance(eff, DeleteDispatch):
                self.deleted.append(eff.seq)
        self.effects += effects
        self.records += self.ledger.take_states(now)
        self.job_records += self.ledger.take_jobs()
        return effects

    # -- inputs, each applied at once --------------------------------------------------------------
    def declare(self, total: int | None, job: str = J) -> list[Effect]:
        return self.apply(self.ledger.declare(spec(job, total), self.now))

    def admit(self, *tasks: str | TaskEnvelope, job: str = J) -> list[Effect]:
        out: list[Effect] = []
        for t in tasks:
            e = env(t, job) if isinstance(t, str) else t
            self.intake += 1
            self.envs.append((e, self.intake))
            out += self.apply(self.ledger.admit(e, self.now, intake_seq=self.intake))
        return out

    def start(self, worker: str, task: str, delivery: int = 1, *, job: str = J) -> int:
        """Start the current dispatch of ``task`` (its ``delivery``-th delivery); returns the token."""
        tok = self.token(task, delivery, job=job)
        self.started(worker, task, tok, job=job, attempt=self.entry(task, job).attempt)
        return tok

    def started(self, worker: str, task: str, tok: int, *, job: str = J, attempt: int = 1) -> list[Effect]:
        return self.apply(self.ledger.started(start(worker, (task, tok), job=job, attempt=attempt), self.now))

    def done(self, task: str, tok: int, **kw: Any) -> list[Effect]:
        report = done(task, tok, **kw)
        return self.apply(self.ledger.done(report, self.now, raw=report.to_wire()))

    def finish(self, task: str, worker: str = "w1", *, job: str = J, **kw: Any) -> list[Effect]:
        """Start the current dispatch of ``task`` on ``worker`` and report its outcome."""
        tok = self.start(worker, task, job=job)
        attempt = self.entry(task, job).attempt
        return self.done(task, tok, worker=worker, job=job, attempt=attempt, **kw)

    def tick(self, now: float) -> list[Effect]:
        self.now = now
        return self.apply(self.ledger.tick(now))

    def worker_lost(self, worker: str) -> list[Effect]:
        return self.apply(self.ledger.worker_lost(worker, self.now))

    def cancel(self, task: str | None = None, job: str = J) -> list[Effect]:
        return self.apply(self.ledger.cancel(cancel(job, task), self.now))

    def retry(self, **kw: Any) -> list[Effect]:
        return self.apply(self.ledger.retry_request(retry_req(**kw), self.now))

    # -- lookups -----------------------------------------------------------------------------------
    def entry(self, task: str, job: str = J) -> TaskEntry:
        e = self.ledger.task(job, task)
        assert e is not None, f"{job}/{task} unknown"
        return e

    def state(self, task: str, job: str = J) -> TaskState | None:
        e = self.ledger.task(job, task)
        return None if e is None else e.state

    def token(self, task: str, delivery: int = 1, *, job: str = J) -> int:
        seq = self.entry(task, job).seq
        assert seq is not None, f"{job}/{task} has no dispatch"
        return fencing.make(seq, delivery)

    def last(self, task: str, job: str = J) -> TaskRecord:
        return [r for r in self.records if (r.job_id, r.task_id) == (job, task)][-1]

    def last_job(self, job: str = J) -> JobRecord:
        return [r for r in self.job_records if r.job_id == job][-1]

    def results(self, task: str | None = None) -> list[DoneReport]:
        out = [DoneReport.from_wire(e.raw) for e in only(self.effects, SaveResult)]
        return [r for r in out if task is None or r.task_id == task]

    def letters(self) -> list[Publish]:
        return only(self.effects, Publish)

    # -- recovery ----------------------------------------------------------------------------------
    def restart(self, now: float | None = None, *, rand: Any = no_jitter) -> list[Effect]:
        """A fresh ledger from the last record of each task and job, as ``recovery.recover`` does."""
        if now is not None:
            self.now = now
        fresh = Ledger(rand=rand)
        last_jobs = {r.job_id: r for r in self.job_records}
        last_tasks = {(r.job_id, r.task_id): r for r in self.records}
        for jr in last_jobs.values():
            fresh.restore_job(jr)
        for tr in last_tasks.values():
            fresh.restore_task(tr)
        for e, seq in self.envs:  # tasks that never left the waiting room: from the task store
            job = fresh.jobs.get(e.job_id)
            if job is None or job.finished_at is None:
                fresh.admit(e, self.now, intake_seq=seq)
        self.ledger = fresh
        return self.apply(fresh.after_restore(self.now))
