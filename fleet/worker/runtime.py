"""The worker: pull work sized to free slots, run it under a renewed lease, report the outcome once.

Every fetched message is a *delivery* named by its fencing token (``fleet.core.fencing``): it is
registered (:mod:`fleet.worker.registry`) the moment it is fetched, so the pulse thread
(:mod:`fleet.worker.pulse`) lists it in heartbeats and renews its lease from then on. One start
report per fetched batch is stored before any of its tasks runs; each task's done report is stored
before its message is acked (:mod:`fleet.worker.commit`). A delivery the scheduler fences, or whose
lease this worker could not renew, is stopped and never reported as a success.

One TaskGroup supervises the fetch loop, the event flusher and every delivery; a task's slot is held
by a context manager for exactly the task's lifetime (longer only for a thread that cannot be
stopped). On SIGTERM the worker stops fetching at once, gives running tasks ``grace_s``, then
reports the rest ``preempted`` and acks them, and exits about a second later.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from broker import names
from broker.connection import connect, shutdown
from broker.provision import ensure_bus, ensure_queue
from broker.publisher import ACK_TIMEOUT, Publisher
from fleet.core import fencing
from fleet.core.records import CancelRequest, TaskEnvelope
from fleet.worker.allow import AllowList
from fleet.worker.commit import Committer
from fleet.worker.context import TaskContext, TaskInfo
from fleet.worker.delivery import Running, Stop, start_report
from fleet.worker.events import EventSink, Source
from fleet.worker.execute import Executor
from fleet.worker.pulse import Pulse
from fleet.worker.registry import FENCE_AFTER, Held, PublishWatch, Registry
from fleet.worker.runner import Runner
from fleet.worker.settings import WorkerSettings, default_worker_id
from fleet.worker.slots import Slot, Slots
from fleet.worker.tokens import TokenPools

RECENT_TOKENS = 10_000
"""How many recently run tokens a worker remembers (to never run a repeated delivery twice)."""

__all__ = ["Worker", "WorkerSettings", "serve"]

log = logging.getLogger("fleet.worker")
T = TypeVar("T")

EXIT_MARGIN_S = 0.8
PLACED_INACTIVE_S = 3600.0
"""A dead worker's placement consumer is removed by the server after this long unused."""
"""After the grace period, how long preempted tasks have to be reported before the worker exits."""


class Worker:
    def __init__(self, url: str, settings: WorkerSettings | None = None) -> None:
        self.url = url
        self.s = settings or WorkerSettings()
        names.check_token(self.s.queue, "queue")
        self.worker_id = names.check_token(self.s.worker_id or default_worker_id(), "worker id")
        self.slots = Slots(self.s.concurrency)
        self.running: dict[int, Running] = {}
        self._recent: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Tokens this worker ran lately: a repeated delivery of one of them is never run again."""
        """Deliveries on this worker's loop, by fencing token."""
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.heartbeat_s = self.s.heartbeat_s
        self.lease_s = self.s.lease_s
        self.allow = AllowList(self.s.allow)
        self.watch = PublishWatch()
        self.nc: NATS | None = None
        self.registry = Registry(lease_s=self.lease_s, interval_s=self.heartbeat_s)
        self._stop_at: float | None = None
        self._pulse_failed: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def completed(self) -> int:
        """Deliveries whose outcome this worker stored."""
        runner = getattr(self, "runner", None)
        return runner.completed if runner is not None else 0

    def stop(self) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.stopping.set()

    def exit_deadline(self) -> float:
        return math.inf if self._stop_at is None else self._stop_at + self.s.grace_s + EXIT_MARGIN_S

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.nc = nc = await connect(self.url, name=f"fleet-worker-{self.worker_id}")
        cancel_sub = None
        try:
            self.js = js = nc.jetstream()
            await ensure_bus(js)  # idempotent: a worker may start before the scheduler
            info = await ensure_queue(js, self.s.queue, lease_s=self.s.lease_s)
            self.lease_s = float(info.config.ack_wait or self.s.lease_s)
            self.registry = Registry(lease_s=self.lease_s, interval_s=self.heartbeat_s)
            psub = await js.pull_subscribe_bind(names.queue_consumer(self.s.queue), stream=names.TASKS_STREAM)
            placed = names.placed_queue(self.worker_id)
            await ensure_queue(js, placed, lease_s=self.lease_s, inactive_s=PLACED_INACTIVE_S)
            self.placed = await js.pull_subscribe_bind(
                names.queue_consumer(placed), stream=names.TASKS_STREAM
            )
            cancel_sub = await nc.subscribe(names.CANCELS, cb=self._on_cancel)
            self.pub = Publisher(nc, ack_timeout=min(ACK_TIMEOUT, max(0.5, self.lease_s / 4)))
            self.events = EventSink(self.pub)
            self.committer = Committer(
                self.pub, self.registry, self.watch, lease_s=self.lease_s, exit_deadline=self.exit_deadline
            )
            self.pulse = Pulse(
                self.url,
                self.worker_id,
                self.s.queue,
                self.registry,
                self,
                loop,
                status=lambda: (self.slots.total, self.slots.busy, self.stopping.is_set()),
                stalled=self._publish_stalled,
                interval_s=self.heartbeat_s,
                lease_s=self.lease_s,
                resources=self.s.resources(),
            )
            self.tokens = TokenPools(self.worker_id, self.pulse.request)
            self._pulse_failed = loop.create_future()
            await self.pulse.start()
            try:
                self.executor = Executor(
                    mode=self.s.executor,
                    concurrency=self.s.concurrency,
                    allow=self.allow,
                    on_linger=self._linger,
                )
                self.runner = Runner(
                    self.worker_id,
                    js,
                    self.executor,
                    self.committer,
                    self.registry,
                    grace_s=self.s.grace_s,
                    forget=self._forget,
                )
                log.info(
                    "worker %s on queue %s: %d slots, lease %gs (renewed every %gs), heartbeat %gs, handlers: %s",
                    self.worker_id,
                    self.s.queue,
                    self.s.concurrency,
                    self.lease_s,
                    self.pulse.renew_s,
                    self.heartbeat_s,
                    self.allow.describe(),
                )
                await self._supervise(psub)
            finally:
                await self.pulse.stop()
                if (executor := getattr(self, "executor", None)) is not None:
                    executor.close(kill=executor.busy > 0)
        finally:
            if cancel_sub is not None:
                with contextlib.suppress(Exception):
                    await cancel_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await shutdown(nc)

    async def _supervise(self, psub: JetStreamContext.PullSubscription) -> None:
        assert self._pulse_failed is not None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            flush = tg.create_task(self.events.run())
            guard = tg.create_task(_raise_when_set(self._pulse_failed))
            self.ready.set()
            async with asyncio.TaskGroup() as loops:  # the queue's runway, and tasks placed on us
                loops.create_task(self._fetch_loop(psub))
                loops.create_task(self._fetch_loop(self.placed))
            await self._drain()
            self.events.close()
            await flush
            guard.cancel()

    def _publish_stalled(self, now: float) -> bool:
        return self.watch.stalled(now, self.pub.last_ack, FENCE_AFTER * self.lease_s)

    def _linger(self, cfut: concurrent.futures.Future[Any]) -> None:
        """A cancelled handler call runs on in its thread: keep a slot for it until it returns."""
        slot = self.slots.take()
        loop = asyncio.get_running_loop()

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to give back
                loop.call_soon_threadsafe(slot.release)

        cfut.add_done_callback(done)

    # -- pulse callbacks (on this loop) ------------------------------------------------------------------
    def on_fenced(self, held: list[Held]) -> None:
        for h in held:
            if (r := self.running.get(h.token)) is not None:
                r.halt(Stop.FENCED, h.reason)

    def on_lost(self, held: list[Held]) -> None:
        for h in held:
            if (r := self.running.get(h.token)) is not None:
                r.halt(Stop.LOST, h.reason)

    def on_confirmed(self) -> None:
        pass  # deliveries waiting for a confirmation poll the registry

    def on_pulse_failed(self, exc: BaseException) -> None:
        if self._pulse_failed is not None and not self._pulse_failed.done():
            self._pulse_failed.set_exception(RuntimeError(f"the heartbeat thread died: {exc!r}"))

    # -- fetching and starting -------------------------------------------------------------------------
    async def _unless_stopping(self, aw: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
        """Run ``aw`` until it ends or the worker is stopping (then it is cancelled: None)."""
        work = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
        return None if work.cancelled() else work

    async def _fetch_loop(self, psub: JetStreamContext.PullSubscription) -> None:
        while not self.stopping.is_set():
            if await self._unless_stopping(self.slots.wait_free()) is None:
                break
            want = self.slots.free
            if want <= 0:
                continue
            fetch = await self._unless_stopping(psub.fetch(want, timeout=self.s.fetch_timeout_s))
            if fetch is None:
                break
            try:
                msgs = fetch.result()
            except (TimeoutError, FetchTimeoutError):
                continue
            except Exception as exc:  # disconnected, leader election: the client reconnects by itself
                log.warning("fetch failed (%s); retrying", exc or type(exc).__name__)
                await self._unless_stopping(asyncio.sleep(0.5))
                continue
            if self.stopping.is_set():  # fetched while stopping: hand straight back
                await _nak_all(msgs)
                break
            try:
                await self._start(msgs)
            except Exception:
                log.exception("could not start %d tasks", len(msgs))
        await self._release_pending(psub)

    async def _release_pending(self, psub: JetStreamContext.PullSubscription) -> None:
        """Stop pulling: hand back messages that arrived for a cancelled fetch, then unsubscribe."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=1)
        await _nak_all(_take_pending(psub))
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        await _nak_all(_take_pending(psub))

    async def _start(self, msgs: list[Msg]) -> None:
        now = time.monotonic()
        batch: list[tuple[Running, Slot]] = []
        for m in msgs:
            meta = m.metadata
            delivery = max(1, meta.num_delivered or 1)
            token = fencing.make(meta.sequence.stream, delivery)
            if token in self.running or token in self._recent:
                # JetStream handed out a delivery this worker holds or just ran (a server crash lost
                # the consumer's delivery count): the same message, so never a second run
                log.warning("ignoring a repeated delivery of token %d on %s", token, m.subject)
                continue
            try:
                env = TaskEnvelope.from_wire(m.data)
            except ValueError as exc:  # the scheduler validated it: this is corruption
                job_id, task_id = names.task_of(m.subject)
                held = self.registry.add(token, job_id, task_id, m.reply, now)
                self._tg.create_task(self.runner.reject(m, held, delivery, str(exc), self.slots.take()))
                continue
            held = self.registry.add(token, env.job_id, env.task_id, m.reply, now)
            info = TaskInfo(
                env.task_id, env.job_id, env.attempt, delivery, self.worker_id, self.s.queue, token=token
            )
            src = Source(env.job_id, env.task_id, env.attempt, token)
            ctx = TaskContext(
                info, self.events.progress_cb(src), self.events.log_cb(src), self.pulse.confirm, self.tokens
            )
            r = Running(held, m, env, delivery, ctx, started_at=time.time())
            self.running[token] = r
            batch.append((r, self.slots.take()))
        if not batch:
            return
        runs = [r for r, _ in batch]
        try:
            stored = await self.committer.store(
                start_report(self.worker_id, runs),
                alive=lambda: any(self.registry.alive(r.held, time.monotonic()) for r in runs),
                until=self.committer.until(),
            )
        except Exception as exc:
            log.error("start report refused: %s", exc)
            stored = False
        for r, slot in batch:
            if stored and (r.stop is None or r.stop < Stop.LOST):
                r.task = self._tg.create_task(self.runner.run(r, slot))
                continue
            slot.release()
            self._forget(r)
            if not stored and not r.held.gone:
                with contextlib.suppress(Exception):
                    await r.msg.nak()  # not started: let another worker have it now
        if not stored:
            log.warning("start report of %d tasks not stored; handed them back", len(runs))

    def _forget(self, r: Running) -> None:
        self.registry.drop(r.token)
        self.running.pop(r.token, None)
        self._recent[r.token] = None
        while len(self._recent) > RECENT_TOKENS:
            self._recent.popitem(last=False)
        r.ctx.close()

    # -- cancel, shutdown -------------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req = CancelRequest.from_wire(msg.data)
        except ValueError as exc:
            log.warning("ignoring malformed cancel on %s: %s", msg.subject, exc)
            return
        for r in list(self.running.values()):
            if r.env.job_id == req.job_id and req.task_id in (None, r.env.task_id):
                r.halt(Stop.CANCELLED, req.reason)

    async def _drain(self) -> None:
        """Let running tasks finish for ``grace_s``; report the rest preempted (and ack them)."""
        stop_at = self._stop_at if self._stop_at is not None else time.monotonic()
        tasks = {r.task for r in self.running.values() if r.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, stop_at + self.s.grace_s - time.monotonic()))
        reason = f"worker {self.worker_id} shut down"
        for r in list(self.running.values()):
            r.halt(Stop.PREEMPTED, reason)
        tasks = {r.task for r in self.running.values() if r.task is not None and not r.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.1, self.exit_deadline() - time.monotonic()))
        for r in list(self.running.values()):
            if r.task is not None and not r.task.done():
                log.warning("task %s (token %d) did not stop in time; abandoning it", r.key, r.token)
                r.task.cancel()


async def _raise_when_set(fut: asyncio.Future[None]) -> None:
    await fut


def _take_pending(psub: JetStreamContext.PullSubscription) -> list[Msg]:
    """Messages the client buffered for a fetch that was cancelled (nats-py keeps them queued)."""
    queue = getattr(getattr(psub, "_sub", None), "_pending_queue", None)
    msgs: list[Msg] = []
    if queue is None:
        return msgs
    while not queue.empty():
        m = queue.get_nowait()
        if m.reply and not (m.headers and m.headers.get("Status")):
            msgs.append(m)
    return msgs


async def _nak_all(msgs: list[Msg]) -> None:
    for m in msgs:
        with contextlib.suppress(Exception):
            await m.nak()


def _exit_if_busy(worker: Worker, code: int) -> None:
    """Handler threads that ignored their cancellation must not keep the process alive."""
    executor = getattr(worker, "executor", None)
    if executor is None or executor.busy == 0:
        return
    log.warning("%d handler calls still running after shutdown: exiting without them", executor.busy)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def serve(url: str, settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM or SIGINT, then shut down gracefully (the CLI path)."""
    worker = Worker(url, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    except BaseException:
        _exit_if_busy(worker, 1)
        raise
    _exit_if_busy(worker, 0)
