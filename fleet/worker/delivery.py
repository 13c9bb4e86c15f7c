"""One delivery on the worker loop (:class:`Running`), why it was stopped, and its reports."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from typing import Any

from nats.aio.msg import Msg

from broker import names
from broker.publisher import Out
from fleet.core.records import (
    DoneReport,
    ErrorInfo,
    Outcome,
    Payload,
    StartedTask,
    StartReport,
    TaskEnvelope,
)
from fleet.worker.context import TaskContext
from fleet.worker.registry import Held


class Stop(enum.IntEnum):
    """Why a delivery was stopped before it finished; a stronger reason replaces a weaker one."""

    PREEMPTED = 1
    """Drained at shutdown after the grace period: reported failed (``preempted``), acked."""
    CANCELLED = 2
    """Cancelled by a user (core-NATS fast path): reported ``cancelled``, acked."""
    LOST = 3
    """Self-fenced (lease not confirmed in time): best-effort ``lost`` report, never acked."""
    FENCED = 4
    """The scheduler fenced it: no report; the pulse acks it if the fence says so."""


@dataclasses.dataclass
class Result:
    outcome: Outcome
    value: Any = None
    error: ErrorInfo | None = None


@dataclasses.dataclass(eq=False)
class Running:
    held: Held
    msg: Msg
    env: TaskEnvelope
    delivery: int
    ctx: TaskContext
    started_at: float
    task: asyncio.Task[None] | None = None
    stop: Stop | None = None
    reason: str = ""
    concluding: bool = False
    """The work is over and its outcome is being reported: only a fence or a lost lease stops it."""
    items: int | None = None

    @property
    def token(self) -> int:
        return self.held.token

    @property
    def key(self) -> str:
        return f"{self.env.job_id}/{self.env.task_id}"

    def halt(self, why: Stop, reason: str) -> None:
        """Stop this delivery for ``why`` (a weaker reason than the current one changes nothing)."""
        if self.stop is not None and self.stop >= why:
            return
        self.stop, self.reason = why, reason
        if why >= Stop.LOST:
            self.ctx.fence()
        else:
            self.ctx.cancel()
        if self.task is not None and not self.task.done() and (not self.concluding or why >= Stop.LOST):
            self.task.cancel()


def start_report(worker_id: str, batch: list[Running]) -> Out:
    report = StartReport(
        worker_id=worker_id,
        at=time.time(),
        tasks=[
            StartedTask(
                task_id=r.env.task_id,
                job_id=r.env.job_id,
                attempt=r.env.attempt,
                delivery=r.delivery,
                token=r.token,
            )
            for r in batch
        ],
    )
    return Out(names.report_start(worker_id), report.to_wire(), names.msgid_start(worker_id, batch[0].token))


def done_report(
    worker_id: str,
    *,
    job_id: str,
    task_id: str,
    attempt: int,
    delivery: int,
    token: int,
    outcome: Outcome,
    started_at: float,
    result: Payload | None = None,
    error: ErrorInfo | None = None,
    items: int | None = None,
) -> Out:
    report = DoneReport(
        task_id=task_id,
        job_id=job_id,
        attempt=attempt,
        delivery=delivery,
        token=token,
        worker_id=worker_id,
        outcome=outcome,
        result=result,
        items=items,
        error=error,
        started_at=started_at,
        finished_at=max(started_at, time.time()),
    )
    return Out(names.report_done(job_id, task_id), report.to_wire(), names.msgid_done(job_id, task_id, token))


def report_of(
    worker_id: str, r: Running, outcome: Outcome, result: Payload | None, error: ErrorInfo | None
) -> Out:
    return done_report(
        worker_id,
        job_id=r.env.job_id,
        task_id=r.env.task_id,
        attempt=r.env.attempt,
        delivery=r.delivery,
        token=r.token,
        outcome=outcome,
        started_at=r.started_at,
        result=result,
        error=error,
        items=r.items,
    )


def attempt_header(msg: Msg) -> int:
    """The attempt number the scheduler put in the headers (for a task whose body is unreadable)."""
    try:
        return max(1, int((msg.headers or {}).get(names.HDR_ATTEMPT, 1)))
    except (TypeError, ValueError):
        return 1
