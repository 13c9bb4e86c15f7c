"""The scheduler service: the I/O shell around :class:`fleet.core.ledger.Ledger`.

Three inputs, each pulled in batches: the intake stream (job declarations, submissions, retries,
cancels), the reports stream (workers' start and done reports) and worker heartbeats (core NATS).
For every batch it asks the ledger what to do, publishes the resulting records (bounded async
windows, one wait for the whole batch), and only then acknowledges the inputs. A crash therefore
loses nothing: inputs not yet acknowledged are redelivered, and the ledger ignores what it has
already applied.

State lives in JetStream, not in this process: task states are the last ``state`` event per task
in FLEET_EVENTS, job summaries are in the ``fleet_jobs`` KV bucket. On start the scheduler rebuilds
its ledger from both (:meth:`Scheduler.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError, KeyNotFoundError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import names, reader
from broker.codec import DecodeError
from broker.connection import connect, shutdown
from broker.provision import BusConfig, ensure_bus
from broker.publisher import Publisher
from fleet.core.ledger import Broadcast, Defer, Effect, Ledger, Publish, Purge
from fleet.core.liveness import WorkerTable
from fleet.core.records import (
    CancelRequest,
    DoneReport,
    Heartbeat,
    InvalidRecord,
    JobRecord,
    JobSpec,
    StartReport,
    TaskEnvelope,
    TaskEvent,
)

log = logging.getLogger("fleet.scheduler")

Handled = tuple[list[Effect], float | None]
"""What handling one input gives: the effects, and a delay when the input must wait (NAK)."""


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_SCHEDULER_")

    batch: int = 512
    """Most messages pulled from one input per round."""
    flush_s: float = 0.25
    """How often job summaries are written and lost workers are looked for."""
    missed_heartbeats: float = 3.0
    """A worker is lost after this many heartbeat intervals without one."""
    keep_finished_s: float = 600.0
    """How long a finished job's tasks stay in memory (history stays in the streams)."""
    history_s: float = 72 * 3600.0


class Scheduler:
    def __init__(
        self, url: str, settings: SchedulerSettings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url
        self.s = settings or SchedulerSettings()
        self.clock = clock
        self.ledger = Ledger()
        self.workers = WorkerTable(missed=self.s.missed_heartbeats)
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.nc: NATS | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        self.nc = nc = await connect(self.url, name="fleet-scheduler")
        js = nc.jetstream()
        await ensure_bus(js, BusConfig(history_s=self.s.history_s), authoritative=True)
        self.js = js
        self.pub = Publisher(js)
        self.kv = await js.key_value(names.JOBS_BUCKET)
        await self.recover()
        intake = await js.pull_subscribe_bind(names.INTAKE_CONSUMER, stream=names.INTAKE_STREAM)
        reports = await js.pull_subscribe_bind(names.REPORTS_CONSUMER, stream=names.REPORTS_STREAM)
        hb_sub = await nc.subscribe(names.HEARTBEATS, cb=self._on_heartbeat)
        log.info("scheduler ready on %s", self.url)
        try:
            async with asyncio.TaskGroup() as tg:
                loops = [
                    tg.create_task(self._pull_loop(intake, self._on_intake)),
                    tg.create_task(self._pull_loop(reports, self._on_report)),
                    tg.create_task(self._housekeeping()),
                ]
                self.ready.set()
                await self.stopping.wait()
                for t in loops:
                    t.cancel()
            await self._flush_jobs()
        finally:
            with contextlib.suppress(Exception):
                await hb_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await shutdown(nc)

    # -- recovery ------------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Rebuild the ledger: job records from KV, task states from the last state events."""
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            keys = []
        restored = 0
        for key in keys:
            try:
                entry = await self.kv.get(key)
                record = JobRecord.from_wire(entry.value or b"")
            except (KeyNotFoundError, ValueError) as exc:
                log.warning("skipping job record %s: %s", key, exc)
                continue
            if record.finished:
                continue
            self.ledger.restore_job(record)
            async for msg in reader.replay(
                self.js, names.EVENTS_STREAM, names.job_states_filter(record.job_id), last_per_subject=True
            ):
                with contextlib.suppress(ValueError):
                    self.ledger.restore_task(TaskEvent.from_wire(msg.data))
                    restored += 1
        if restored:
            log.info("recovered %d task states", restored)

    # -- input loops ---------------------------------------------------------------------------------
    async def _pull_loop(
        self, psub: JetStreamContext.PullSubscription, handle: Callable[[Msg, float], Handled]
    ) -> None:
        while True:
            try:
                msgs = await psub.fetch(self.s.batch, timeout=1.0)
            except (TimeoutError, FetchTimeoutError):
                continue
            effects: list[Effect] = []
            done: list[tuple[Msg, float | None]] = []
            now = self.clock()
            for msg in msgs:
                try:
                    out, delay = handle(msg, now)
                except Exception as exc:  # never let one message stop the service
                    log.exception("error handling %s", msg.subject)
                    out = self.ledger.dead_letter(
                        "scheduler", msg.subject, f"internal error: {exc}", msg.data, now
                    )
                    delay = None
                effects += out
                done.append((msg, delay))
            try:
                await self._apply(effects)
                await self._flush_jobs()  # job records are durable before their inputs are acked
            except Exception:
                # not acked: JetStream redelivers these inputs and the ledger ignores what it applied
                log.exception("publishing effects failed; %d inputs will be redelivered", len(done))
                continue
            for msg, delay in done:
                if delay is None:
                    await msg.ack()
                else:
                    await msg.nak(delay=delay)

    def _on_intake(self, msg: Msg, now: float) -> Handled:
        tokens = msg.subject.split(".")
        kind = tokens[2] if len(tokens) > 2 else ""
        try:
            if kind == "job":
                return self.ledger.declare(JobSpec.from_wire(msg.data), now), None
            if kind in ("task", "retry"):
                env = TaskEnvelope.from_wire(msg.data)
                if tokens[3:5] != [env.job_id, env.task_id]:
                    raise InvalidRecord(
                        f"subject {msg.subject} does not match job {env.job_id!r} task {env.task_id!r}"
                    )
                decision, out = self.ledger.admit(env, now)
                return out, max(0.001, decision.delay_s) if isinstance(decision, Defer) else None
            if kind == "cancel":
                return self.ledger.cancel(CancelRequest.from_wire(msg.data), now), None
            raise InvalidRecord(f"unknown intake subject {msg.subject}")
        except (DecodeError, InvalidRecord) as exc:
            log.warning("rejected input on %s: %s", msg.subject, exc)
            return self.ledger.dead_letter("intake", msg.subject, str(exc), msg.data, now), None

    def _on_report(self, msg: Msg, now: float) -> Handled:
        tokens = msg.subject.split(".")
        try:
            if tokens[2:3] == ["start"]:
                return self.ledger.started(StartReport.from_wire(msg.data), now), None
            if tokens[2:3] == ["done"]:
                out, _ = self.ledger.done(DoneReport.from_wire(msg.data), now)
                return out, None
            raise InvalidRecord(f"unknown report subject {msg.subject}")
        except (DecodeError, InvalidRecord) as exc:
            log.warning("rejected report on %s: %s", msg.subject, exc)
            return self.ledger.dead_letter("reports", msg.subject, str(exc), msg.data, now), None

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = Heartbeat.from_wire(msg.data)
        except ValueError as exc:
            log.warning("ignoring malformed heartbeat on %s: %s", msg.subject, exc)
            return
        self.workers.beat(hb, self.clock())

    # -- effects -------------------------------------------------------------------------------------
    async def _apply(self, effects: Sequence[Effect]) -> None:
        batch: list[tuple[str, bytes, str | None]] = []
        for eff in effects:
            if isinstance(eff, Publish):
                batch.append((eff.subject, eff.record.to_wire(), eff.msg_id))
                continue
            if batch:
                await self.pub.publish_many(batch)
                batch = []
            if isinstance(eff, Purge):
                await self.js.purge_stream(names.TASKS_STREAM, subject=eff.subject)
            elif isinstance(eff, Broadcast):
                assert self.nc is not None
                await self.nc.publish(eff.subject, eff.record.to_wire())
        if batch:
            await self.pub.publish_many(batch)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.s.flush_s)
            now = self.clock()
            try:
                for lost in self.workers.expire(now):
                    log.warning(
                        "worker %s lost (no heartbeat for %.1fs)", lost.worker_id, now - lost.last_seen
                    )
                    await self._apply(self.ledger.worker_lost(lost, now))
                await self._flush_jobs()
            except Exception:  # transient (leader election, disconnect): try again next round
                log.exception("housekeeping failed")
            self.ledger.prune(now, self.s.keep_finished_s)

    async def _flush_jobs(self) -> None:
        for record in self.ledger.take_dirty():
            data = record.to_wire()
            await self.kv.put(record.job_id, data)
            await self.pub.fire(names.job_event_subject(record.job_id), data)


async def serve(url: str, settings: SchedulerSettings) -> None:
    import signal

    sched = Scheduler(url, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sched.stop)
    await sched.run()


__all__ = ["Scheduler", "SchedulerSettings", "serve"]
