"""Running one delivery to its end: load the inputs, run the work, classify, report once.

A delivery ends in one of these ways:

* it finished (succeeded, or failed with a classified error): its report is stored, then it is acked;
* it was stopped (:class:`fleet.worker.delivery.Stop`): ``cancelled`` and ``preempted`` are
  reported and acked like an outcome; a *fenced* delivery reports nothing (the scheduler gave the
  task to another holder or it is over); a *lost* one gets a best-effort ``lost`` report, no ack.

The report's Nats-Msg-Id is ``done:<job>/<task>:<token>``, so a delivery can never store two
different outcomes: a late ``lost`` report after a stored success is a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import blobs
from broker.publisher import Out
from fleet.core.records import ErrorInfo, Payload
from fleet.worker import classify
from fleet.worker.commit import Committer
from fleet.worker.delivery import Result, Running, Stop, attempt_header, done_report, report_of
from fleet.worker.execute import Executor, check_inputs
from fleet.worker.registry import Held, Registry
from fleet.worker.slots import Slot

log = logging.getLogger("fleet.worker")


class Runner:
    def __init__(
        self,
        worker_id: str,
        js: JetStreamContext,
        executor: Executor,
        committer: Committer,
        registry: Registry,
        *,
        grace_s: float,
        forget: Callable[[Running], None],
    ) -> None:
        self.worker_id = worker_id
        self.js = js
        self.executor = executor
        self.committer = committer
        self.registry = registry
        self.grace_s = grace_s
        self.forget = forget
        self.completed = 0

    async def run(self, r: Running, slot: Slot) -> None:
        with slot:
            try:
                result = await self.execute(r)
                r.concluding = True
                if result is not None:
                    await self.conclude(r, result)
            except asyncio.CancelledError:
                if r.stop is None:
                    raise  # the worker itself is being torn down
                _uncancel()
                if r.stop is Stop.LOST:
                    await self.report_lost(r)
            except Exception:
                log.exception("task %s (token %d) could not be concluded", r.key, r.token)
            finally:
                self.forget(r)

    async def execute(self, r: Running) -> Result | None:
        """Run the work; the Result to report, or None when fenced (nothing may be reported)."""
        env = r.env
        timer: asyncio.Timeout | None = None
        try:
            if r.stop is not None:
                return self.stopped(r)
            try:
                payload = env.payload.model_dump(exclude_none=True)
                inputs = check_inputs(await blobs.load_payload(self.js, payload, job=env.job_id))
            except Exception as exc:
                return Result("failed", error=classify.error_info(exc, "input"))
            if isinstance(inputs.get("items"), list):
                r.items = len(inputs["items"])
            async with asyncio.timeout(env.timeout_s) as timer:
                if env.handler is not None:
                    value = await self.executor.run_handler(env.handler, inputs, r.ctx)
                else:
                    value = await self.executor.run_command(env.command or [], inputs, r.ctx)
            return Result("succeeded", value)
        except asyncio.CancelledError:
            if r.stop is None:
                raise
            _uncancel()
            return self.stopped(r)
        except TimeoutError as exc:
            if timer is not None and timer.expired():
                return Result("failed", error=classify.timeout(env.timeout_s))
            return Result("failed", error=classify.error_info(exc))
        except Exception as exc:
            return Result("failed", error=classify.error_info(exc))

    def stopped(self, r: Running) -> Result | None:
        if r.stop is Stop.FENCED:
            return None
        if r.stop is Stop.LOST:
            return Result("failed", error=classify.lost(r.reason))
        if r.stop is Stop.CANCELLED:
            return Result("cancelled", error=ErrorInfo(type="Cancelled", message=r.reason, retryable=False))
        return Result("failed", error=classify.preempted(self.grace_s))

    async def conclude(self, r: Running, res: Result) -> None:
        if r.held.fenced or r.stop is Stop.FENCED:
            return
        if r.held.lost or r.stop is Stop.LOST:
            await self.report_lost(r)
            return
        outcome, error, payload = res.outcome, res.error, None
        if outcome == "succeeded":
            left = self.committer.until()() - time.monotonic()
            try:
                async with asyncio.timeout(max(0.1, left)):
                    value = await blobs.make_payload(self.js, res.value, job=r.env.job_id)
                payload = Payload.model_validate(value)
            except Exception as exc:
                outcome, error = "failed", classify.error_info(exc, "result")
        item = report_of(self.worker_id, r, outcome, payload, error)
        fallback = None
        if outcome == "succeeded":
            why = classify.infra("ResultNotStored", "the server refused the report of a successful run")
            fallback = report_of(self.worker_id, r, "failed", None, why)
        if await self.committer.finish(r.held, r.msg, item, fallback):
            self.completed += 1

    async def report_lost(self, r: Running) -> None:
        reason = r.reason or r.held.reason or "lease lost"
        await self.committer.best_effort(report_of(self.worker_id, r, "failed", None, classify.lost(reason)))

    async def reject(self, m: Msg, held: Held, delivery: int, reason: str, slot: Slot) -> None:
        """An undecodable task: report it failed (``invalid``, never retried), then ack it."""
        with slot:
            try:
                log.error("undecodable task on %s: %s", m.subject, reason)
                if held.job_id is None or held.task_id is None:
                    await self.committer.ack(held, m)  # names no task: nothing to report on
                    return
                item: Out = done_report(
                    self.worker_id,
                    job_id=held.job_id,
                    task_id=held.task_id,
                    attempt=attempt_header(m),
                    delivery=delivery,
                    token=held.token,
                    outcome="failed",
                    started_at=time.time(),
                    error=classify.invalid("InvalidTask", f"undecodable task: {reason}"),
                )
                await self.committer.finish(held, m, item)
            except Exception:
                log.exception("could not reject the undecodable task on %s", m.subject)
            finally:
                self.registry.drop(held.token)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
