"""The worker: pull work sized to free slots, run it under a heartbeat-kept lease, report the outcome.

Lease mapping (see docs/architecture.md): the queue consumer's AckWait is the lease. Every
``heartbeat_s`` the worker sends ``+WPI`` for each message it holds, which restarts that lease, and
publishes one :class:`Heartbeat` for the scheduler. If the worker dies the ``+WPI`` stop and
JetStream redelivers each held task once its AckWait lapses, to whichever worker pulls next.

One TaskGroup supervises the fetch loop, the heartbeat loop, the event flusher and every running
task; a task's slot is held by a context manager for exactly the task's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import blobs, names
from broker.connection import connect, shutdown
from broker.provision import ensure_bus, ensure_queue
from broker.publisher import Publisher
from fleet.core.records import (
    CancelRequest,
    DoneReport,
    ErrorInfo,
    Heartbeat,
    Outcome,
    Payload,
    StartedTask,
    StartReport,
    TaskEnvelope,
)
from fleet.worker.context import TaskContext, TaskInfo
from fleet.worker.errors import FleetTaskError, Retry, TaskTimeout
from fleet.worker.events import EventSink
from fleet.worker.execute import Executor

log = logging.getLogger("fleet.worker")


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_WORKER_")

    queue: str = "default"
    concurrency: int = 4
    executor: str = "thread"
    heartbeat_s: float = 2.0
    """How often held leases are renewed; never more than a third of the lease."""
    lease_s: float = 10.0
    """AckWait of the queue consumer if this worker creates it (an existing consumer's wins)."""
    grace_s: float = 30.0
    """On SIGTERM: how long running tasks may finish before they are released to other workers."""
    fetch_timeout_s: float = 2.0
    worker_id: str = ""


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Slots:
    """Free-slot accounting. :meth:`take` counts a slot at once (so the next fetch sees it); the
    returned :class:`Slot` gives it back when its ``with`` block ends, on every exit path."""

    def __init__(self, n: int) -> None:
        self.total = n
        self.busy = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.total - self.busy

    def take(self) -> Slot:
        self.busy += 1
        return Slot(self)

    def _give_back(self) -> None:
        self.busy -= 1
        self._changed.set()

    async def wait_free(self) -> None:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()


class Slot:
    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._slots is not None:
            self._slots._give_back()
            self._slots = None


@dataclasses.dataclass
class Running:
    msg: Msg
    env: TaskEnvelope
    delivery: int
    ctx: TaskContext
    started_at: float
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    items: int | None = None

    @property
    def key(self) -> str:
        return f"{self.env.job_id}/{self.env.task_id}"


class Worker:
    def __init__(self, url: str, settings: WorkerSettings | None = None) -> None:
        self.url = url
        self.s = settings or WorkerSettings()
        names.check_token(self.s.queue, "queue")
        self.worker_id = names.check_token(self.s.worker_id or default_worker_id(), "worker id")
        self.slots = Slots(self.s.concurrency)
        self.running: dict[str, Running] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.heartbeat_s = self.s.heartbeat_s
        self.completed = 0
        self.nc: NATS | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        self.nc = nc = await connect(self.url, name=f"fleet-worker-{self.worker_id}")
        js = nc.jetstream()
        await ensure_bus(js)  # idempotent: a worker may start before the scheduler
        info = await ensure_queue(js, self.s.queue, lease_s=self.s.lease_s)
        lease = info.config.ack_wait or self.s.lease_s
        self.heartbeat_s = min(self.s.heartbeat_s, lease / 3)
        psub = await js.pull_subscribe_bind(names.queue_consumer(self.s.queue), stream=names.TASKS_STREAM)
        cancel_sub = await nc.subscribe(names.CANCELS, cb=self._on_cancel)
        self.pub = Publisher(js)
        self.events = EventSink(self.pub)
        self.executor = Executor(mode=self.s.executor, concurrency=self.s.concurrency)
        log.info(
            "worker %s on queue %s: %d slots, lease %.1fs, heartbeat %.1fs",
            self.worker_id,
            self.s.queue,
            self.s.concurrency,
            lease,
            self.heartbeat_s,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                beat = tg.create_task(self._heartbeats(nc))
                flush = tg.create_task(self.events.run())
                self.ready.set()
                await self._fetch_loop(js, psub)
                await self._drain()
                await self._send_heartbeat(nc)
                beat.cancel()
                self.events.close()
                await flush
        finally:
            self.executor.close()
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await shutdown(nc)

    async def _fetch_loop(self, js: JetStreamContext, psub: JetStreamContext.PullSubscription) -> None:
        while not self.stopping.is_set():
            waiter = asyncio.ensure_future(self.slots.wait_free())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stop.cancel()
            if self.stopping.is_set():
                return
            try:
                msgs = await psub.fetch(self.slots.free, timeout=self.s.fetch_timeout_s)
            except (TimeoutError, FetchTimeoutError):
                continue
            except Exception:  # disconnected, leader election: the client reconnects by itself
                log.exception("fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if self.stopping.is_set():  # fetched while stopping: hand straight back
                for m in msgs:
                    await m.nak()
                return
            try:
                await self._start(js, msgs)
            except Exception:  # start report not stored: leases lapse and the tasks are redelivered
                log.exception("could not start %d tasks", len(msgs))

    async def _start(self, js: JetStreamContext, msgs: list[Msg]) -> None:
        batch: list[Running] = []
        for m in msgs:
            try:
                env = TaskEnvelope.from_wire(m.data)
            except ValueError as exc:  # the scheduler validated it; this is corruption
                await self._reject(m, str(exc))
                continue
            delivery = m.metadata.num_delivered or 1
            info = TaskInfo(env.task_id, env.job_id, env.attempt, delivery, self.worker_id, self.s.queue)
            ctx = TaskContext(info, self.events.progress_cb(env), self.events.log_cb(env))
            batch.append(Running(m, env, delivery, ctx, time.time()))
        if not batch:
            return
        report = StartReport(
            worker_id=self.worker_id,
            at=time.time(),
            tasks=[
                StartedTask(
                    task_id=r.env.task_id, job_id=r.env.job_id, attempt=r.env.attempt, delivery=r.delivery
                )
                for r in batch
            ],
        )
        await self.pub.publish(names.report_start(self.worker_id), report.to_wire())
        for r in batch:
            self.running[r.key] = r
            r.task = self._tg.create_task(self._run(r, js, self.slots.take()))

    async def _run(self, r: Running, js: JetStreamContext, slot: Slot) -> None:
        with slot:
            try:
                outcome, result, error = await self._execute(r, js)
                await self._report(r, js, outcome, result, error)
                await r.msg.ack()
                self.completed += 1
            except asyncio.CancelledError:
                # released on shutdown: give the task back at once for another worker
                with contextlib.suppress(Exception):
                    await r.msg.nak()
            except Exception:
                log.exception("reporting %s failed; the lease will lapse and it will be redelivered", r.key)
            finally:
                self.running.pop(r.key, None)
                r.ctx.close()

    async def _execute(self, r: Running, js: JetStreamContext) -> tuple[Outcome, Any, ErrorInfo | None]:
        env = r.env
        try:
            inputs = await blobs.load_payload(js, env.payload.model_dump(exclude_none=True))
            if not isinstance(inputs, dict):
                raise TypeError(
                    f"task inputs must be a map with args/kwargs/items, got {type(inputs).__name__}"
                )
            if isinstance(inputs.get("items"), list):
                r.items = len(inputs["items"])
            async with asyncio.timeout(env.timeout_s):
                if env.handler is not None:
                    value = await self.executor.run_handler(env.handler, inputs, r.ctx)
                else:
                    value = await self.executor.run_command(env.command or [], inputs, r.ctx)
            return "succeeded", value, None
        except TimeoutError:
            err = TaskTimeout(f"attempt exceeded its timeout of {env.timeout_s}s")
            return "failed", None, _error_info(err)
        except asyncio.CancelledError:
            if r.cancel_reason is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return "cancelled", None, ErrorInfo(type="Cancelled", message=r.cancel_reason, retryable=False)
        except Exception as exc:
            return "failed", None, _error_info(exc)

    async def _report(
        self, r: Running, js: JetStreamContext, outcome: Outcome, value: Any, error: ErrorInfo | None
    ) -> None:
        result: Payload | None = None
        if outcome == "succeeded":
            try:
                result = Payload.model_validate(await blobs.make_payload(js, value))
            except TypeError as exc:
                outcome, error = (
                    "failed",
                    ErrorInfo(type="ResultNotSerializable", message=str(exc), retryable=False),
                )
        report = DoneReport(
            task_id=r.env.task_id,
            job_id=r.env.job_id,
            attempt=r.env.attempt,
            delivery=r.delivery,
            worker_id=self.worker_id,
            outcome=outcome,
            result=result,
            items=r.items,
            error=error,
            started_at=r.started_at,
            finished_at=time.time(),
            envelope=r.env if outcome == "failed" else None,
        )
        msg_id = f"done:{r.key}:{r.env.attempt}#{r.delivery}"
        await self.pub.publish(names.report_done(r.env.job_id, r.env.task_id), report.to_wire(), msg_id)

    async def _reject(self, m: Msg, reason: str) -> None:
        """An undecodable task: report it failed (never retried) so its job can finish, then drop it."""
        log.error("dropping undecodable task on %s: %s", m.subject, reason)
        job_id, task_id = names.task_of(m.subject)
        if job_id and task_id:
            now = time.time()
            report = DoneReport(
                task_id=task_id,
                job_id=job_id,
                attempt=1,
                delivery=m.metadata.num_delivered or 1,
                worker_id=self.worker_id,
                outcome="failed",
                started_at=now,
                finished_at=now,
                error=ErrorInfo(type="InvalidTask", message=f"undecodable task: {reason}", retryable=False),
            )
            await self.pub.publish(names.report_done(job_id, task_id), report.to_wire())
        await m.term()

    # -- heartbeats, cancel, shutdown ----------------------------------------------------------------
    async def _heartbeats(self, nc: NATS) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for r in list(self.running.values()):
                with contextlib.suppress(Exception):
                    await r.msg.in_progress()  # +WPI: restart this message's AckWait
            await self._send_heartbeat(nc)

    async def _send_heartbeat(self, nc: NATS) -> None:
        hb = Heartbeat(
            worker_id=self.worker_id,
            queue=self.s.queue,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.slots.total,
            busy=self.slots.busy,
            tasks=sorted(self.running),
            at=time.time(),
            interval_s=self.heartbeat_s,
            stopping=self.stopping.is_set(),
        )
        with contextlib.suppress(Exception):
            await nc.publish(names.heartbeat_subject(self.worker_id), hb.to_wire())

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req = CancelRequest.from_wire(msg.data)
        except ValueError as exc:
            log.warning("ignoring malformed cancel on %s: %s", msg.subject, exc)
            return
        for r in list(self.running.values()):
            if r.env.job_id == req.job_id and req.task_id in (None, r.env.task_id) and r.task is not None:
                r.cancel_reason = req.reason
                r.ctx.cancel()
                r.task.cancel()

    async def _drain(self) -> None:
        """Let running tasks finish for ``grace_s``; then release the rest to other workers."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.s.grace_s)
        for r in list(self.running.values()):
            if r.task is not None:
                r.task.cancel()


def _error_info(exc: BaseException) -> ErrorInfo:
    retryable = getattr(exc, "retryable", True) if isinstance(exc, FleetTaskError) else True
    delay = exc.delay_s if isinstance(exc, Retry) else None
    tb = "".join(traceback.format_exception(exc))[-8000:]
    return ErrorInfo(
        type=type(exc).__name__,
        message=str(exc)[:2000] or type(exc).__name__,
        traceback=tb,
        retryable=retryable,
        retry_after_s=delay,
    )


async def serve(url: str, settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM or SIGINT, then shut down gracefully."""
    worker = Worker(url, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
