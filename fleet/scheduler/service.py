"""The scheduler service: the I/O shell around :class:`fleet.core.ledger.Ledger`.

Inputs, each pulled in batches by its own fetcher: submissions (``scheduler-intake``), job
declarations, cancels and retry requests (``scheduler-control``: they never wait behind a backlog
of submissions), workers' start and done reports (``scheduler-reports``), and heartbeats (core-NATS
requests, answered at once with fences). One engine applies the batches one at a time: the ledger
decides, :class:`fleet.scheduler.apply.Applier` stores the effects (retrying until they are
stored), and only then are the inputs acknowledged. So a crash loses nothing: unacknowledged
inputs come back and are applied again to the state of record, and every effect is idempotent.

A clock tick (every ``flush_s``) requeues the tasks of workers whose heartbeats stopped, dispatches
retries that are due, and, more rarely, prunes memory and archives old finished jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import FetchTimeoutError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import names, reader
from broker.codec import DecodeError
from broker.connection import connect, shutdown
from broker.provision import SCHEDULER_ACK_WAIT_S, BusConfig, ensure_bus
from broker.publisher import Publisher
from broker.puller import Puller
from fleet.core.effects import Effect
from fleet.core.ledger import Ledger
from fleet.core.liveness import WorkerTable
from fleet.core.records import (
    CancelRequest,
    DoneReport,
    Heartbeat,
    HeartbeatReply,
    InvalidRecord,
    JobSpec,
    PrioritizeRequest,
    Resources,
    RetryRequest,
    StartReport,
    TaskEnvelope,
    TokenGrant,
    TokenRequest,
)
from fleet.policy.config import Policy
from fleet.scheduler import policy_store, recovery
from fleet.scheduler.apply import Applier
from fleet.scheduler.faults import Faults

log = logging.getLogger("fleet.scheduler")

Handler = Callable[[Msg, float], Awaitable[list[Effect]]]
DAY = 24 * 3600.0


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_SCHEDULER_")

    batch: int = 512
    """Most messages pulled from one input per round."""
    flush_s: float = 0.25
    """How often lost workers and due retries are looked for."""
    missed_heartbeats: float = 2.5
    """A worker is lost after this many heartbeat intervals without one (2.5 s at 1 s heartbeats)."""
    keep_finished_s: float = 600.0
    """How long a finished job's task entries stay in memory (their records stay in JetStream)."""
    archive_after_s: float = 7 * DAY
    """Finished jobs are archived (records, inputs, results, events and blobs removed) after this."""
    history_s: float = 72 * 3600.0
    """Age limit of the event history (progress, logs, state history, job events)."""
    token_lease_s: float = 2.0
    """How long rate-limit tokens leased to a worker stay usable."""
    policy_file: str | None = None
    """A policy YAML file (``fleet.policy.config``) stored in KV at start; else the stored one."""


class Scheduler:
    def __init__(
        self, url: str, settings: SchedulerSettings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url
        self.s = settings or SchedulerSettings()
        self.clock = clock
        self.ledger = Ledger()
        self.workers = WorkerTable(missed=self.s.missed_heartbeats)
        self.faults = Faults.from_env()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.nc: NATS | None = None
        self.inbox: asyncio.Queue[tuple[Handler, list[Msg], asyncio.Event]] = asyncio.Queue()
        self._current: list[Msg] = []
        self._wpi_at = 0.0
        self._reports_idle_at = time.monotonic()
        self._last_tick = time.monotonic()
        self._slow_at = 0.0
        self._explain_at = 0.0
        self._usage_at = 0.0
        self._ack_all: dict[Handler, bool] = {}
        self._policy: Policy | None = None
        """A new policy from KV, applied by the engine at its next round."""

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        self.nc = nc = await connect(self.url, name="fleet-scheduler", on_reconnected=self._reconnected)
        self.js = js = nc.jetstream()
        await ensure_bus(js, BusConfig(history_s=self.s.history_s), authoritative=True)
        self.pub = Publisher(nc)
        self.applier = Applier(nc, js, self.pub, self.ledger, self.clock, self.faults, self._keep_inputs)
        policy = await policy_store.startup(js, self.s.policy_file)
        self.ledger.configure(policy, self.clock())
        await policy_store.load_usage(js, self.ledger.gate)
        effects = await self.applier.durably(
            "recovery", lambda: recovery.recover(js, self.ledger, self.clock())
        )
        for worker_id in self.ledger.holders():
            self.workers.seed(worker_id, time.monotonic())
        await self.applier.apply(effects)
        await recovery.release_inputs(js)
        subs = []
        for c, s, h in (
            (names.CONTROL_CONSUMER, names.INTAKE_STREAM, self._on_control),
            (names.INTAKE_CONSUMER, names.INTAKE_STREAM, self._on_intake),
            (names.REPORTS_CONSUMER, names.REPORTS_STREAM, self._on_report),
        ):
            info = await js.consumer_info(s, c)
            self._ack_all[h] = info.config.ack_policy == api.AckPolicy.ALL  # older stores: explicit
            subs.append((await Puller(nc, s, c).start(), h))
        hb_sub = await nc.subscribe(names.HEARTBEATS, cb=self._on_heartbeat)
        token_sub = await nc.subscribe(names.TOKENS, cb=self._on_tokens)
        log.info("scheduler ready on %s", self.url)
        try:
            async with asyncio.TaskGroup() as tg:
                loops = [tg.create_task(self._fetch(p, h)) for p, h in subs]
                loops.append(tg.create_task(self._engine()))
                loops.append(tg.create_task(policy_store.watch(js, self._new_policy)))
                self.ready.set()
                await self.stopping.wait()
                for t in loops:
                    t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.applier.flush_records(), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(policy_store.save_usage(js, self.ledger.gate, self.clock()), 2.0)
        finally:
            with contextlib.suppress(Exception):
                await hb_sub.unsubscribe()
                await token_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await shutdown(nc)

    def _new_policy(self, policy: Policy) -> None:
        self._policy = policy

    def slots(self) -> dict[str, int]:
        """Slots of the live workers of each queue (what the runway is sized to); also tells the
        ledger what each live worker has, for tasks that ask for resources."""
        out: dict[str, int] = {}
        live: dict[str, tuple[str, Resources]] = {}
        for w in self.workers.alive():
            if w.queue and not w.stopping:
                out[w.queue] = out.get(w.queue, 0) + w.slots
                live[w.worker_id] = (w.queue, w.resources or Resources(cpus=w.slots))
        self.ledger.gate.placement.sync(live)
        return out

    async def _reconnected(self) -> None:
        self.workers.refresh(time.monotonic())  # nobody is blamed for our own outage

    # -- the engine ---------------------------------------------------------------------------------
    async def _fetch(self, psub: Puller, handle: Handler) -> None:
        reports = handle == self._on_report
        while True:
            try:
                msgs = await psub.fetch(self.s.batch, timeout=1.0)
            except (TimeoutError, FetchTimeoutError):
                _still_cancelled()  # nats-py turns a cancelled fetch into a timeout
                if reports:
                    self._reports_idle_at = time.monotonic()
                continue
            except Exception as exc:  # disconnected, leader election: the client reconnects by itself
                _still_cancelled()
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            _still_cancelled()
            if reports and len(msgs) < self.s.batch:
                self._reports_idle_at = time.monotonic()
            done = asyncio.Event()
            await self.inbox.put((handle, msgs, done))
            await done.wait()

    async def _engine(self) -> None:
        next_tick = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(self.inbox.get(), max(0.0, next_tick - time.monotonic()))
            except TimeoutError:
                item = None
            if item is not None:
                handle, msgs, done = item
                try:
                    await self._process(handle, msgs)
                finally:
                    done.set()
            if time.monotonic() >= next_tick:
                await self._tick()
                next_tick = time.monotonic() + self.s.flush_s

    def _apply_policy(self, now: float) -> None:
        if self._policy is not None:
            self.ledger.configure(self._policy, now)
            self._policy = None

    async def _process(self, handle: Handler, msgs: list[Msg]) -> None:
        now = self.clock()
        self._apply_policy(now)
        effects: list[Effect] = []
        self._current, self._wpi_at = msgs, time.monotonic()
        for msg in msgs:
            try:
                effects += await handle(msg, now)
            except (DecodeError, InvalidRecord) as exc:
                log.warning("rejected input on %s: %s", msg.subject, exc)
                origin = "reports" if msg.subject.startswith(names.PREFIX + ".report.") else "intake"
                effects += self.ledger.dead_letter(origin, msg.subject, str(exc), msg.data, now)
            except Exception as exc:  # never let one message stop the service
                log.exception("error handling %s", msg.subject)
                effects += self.ledger.dead_letter(
                    "scheduler", msg.subject, f"internal error: {exc}", msg.data, now
                )
        effects += self._release(now, self.slots())
        await self.applier.apply(effects)  # retries until stored
        # one ack covers the whole batch where the consumer acks all up to a message (a batch is
        # applied in order and completely before the next is fetched)
        for msg in msgs[-1:] if self._ack_all.get(handle) else msgs:
            with contextlib.suppress(Exception):
                await msg.ack()
        self._current = []

    def _release(self, now: float, slots: dict[str, int]) -> list[Effect]:
        try:
            return self.ledger.release(now, slots)
        except Exception:  # a bug must not stop the service: what was picked is dispatched later
            log.exception("releasing waiting tasks failed")
            return []

    async def _keep_inputs(self) -> None:
        """While effects are being retried, keep the inputs that caused them from being redelivered."""
        if time.monotonic() - self._wpi_at < SCHEDULER_ACK_WAIT_S / 3:
            return
        self._wpi_at = time.monotonic()
        for msg in self._current:
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _tick(self) -> None:
        mono, now = time.monotonic(), self.clock()
        lag = mono - self._last_tick - self.s.flush_s
        if lag > 1.0:  # our loop was stalled: heartbeats could not be heard meanwhile
            log.warning("scheduler loop stalled for %.1fs; extending worker deadlines", lag)
            self.workers.grace(lag)
        self._last_tick = mono
        effects: list[Effect] = []
        if mono - self._reports_idle_at < 5.0:  # reports caught up: a dead worker's last words are in
            for lost in self.workers.expire(mono):
                held = self.ledger.held_by(lost.worker_id)
                log.warning(
                    "worker %s lost (no heartbeat for %.1fs); requeueing %d tasks",
                    lost.worker_id,
                    mono - lost.last_seen,
                    len(held),
                )
                effects += self.ledger.worker_lost(lost.worker_id, now)
        effects += self.ledger.tick(now)
        self._apply_policy(now)
        slots = self.slots()
        effects += self._release(now, slots)
        if mono >= self._explain_at:
            self._explain_at = mono + 1.0
            try:
                self.ledger.explain(now, slots)
            except Exception:
                log.exception("explaining why tasks wait failed")
        if mono >= self._usage_at:
            self._usage_at = mono + 5.0
            try:
                await policy_store.save_usage(self.js, self.ledger.gate, now)
            except Exception as exc:
                log.warning("saving usage failed (%s); retrying later", exc)
        if mono >= self._slow_at:
            self._slow_at = mono + 30.0
            effects += self.ledger.archive_due(now, self.s.archive_after_s)
            self.ledger.prune(now, self.s.keep_finished_s)
            await recovery.check_limits(self.js)
        await self.applier.apply(effects)

    # -- inputs ---------------------------------------------------------------------------------------
    async def _on_intake(self, msg: Msg, now: float) -> list[Effect]:
        env = TaskEnvelope.from_wire(msg.data)
        _expect(msg.subject, names.intake_task(env.job_id, env.task_id))
        if self.ledger.is_pruned(env.job_id) and self.ledger.task(env.job_id, env.task_id) is None:
            await recovery.lookup_task(self.js, self.ledger, env.job_id, env.task_id)
        return self.ledger.admit(env, now, intake_seq=reader.stream_seq(msg))

    async def _on_control(self, msg: Msg, now: float) -> list[Effect]:
        kind = msg.subject.split(".")[2] if msg.subject.count(".") >= 2 else ""
        if kind == "job":
            spec = JobSpec.from_wire(msg.data)
            _expect(msg.subject, names.intake_job(spec.job_id))
            return self.ledger.declare(spec, now)
        if kind == "cancel":
            req = CancelRequest.from_wire(msg.data)
            _expect(msg.subject, names.intake_cancel(req.job_id, req.task_id))
            if req.task_id is not None and self.ledger.is_pruned(req.job_id):
                await recovery.lookup_task(self.js, self.ledger, req.job_id, req.task_id)
            return self.ledger.cancel(req, now)
        if kind == "prio":
            prio = PrioritizeRequest.from_wire(msg.data)
            _expect(msg.subject, names.intake_prioritize(prio.job_id, prio.request_id))
            return self.ledger.prioritize(prio, now)
        if kind == "retry":
            retry = RetryRequest.from_wire(msg.data)
            _expect(msg.subject, names.intake_retry(retry.job_id, retry.request_id))
            if self.ledger.is_pruned(retry.job_id):
                await recovery.reload_job(self.js, self.ledger, retry.job_id)
            return self.ledger.retry_request(retry, now)
        raise InvalidRecord(f"unknown control subject {msg.subject}")

    async def _on_report(self, msg: Msg, now: float) -> list[Effect]:
        kind = msg.subject.split(".")[2] if msg.subject.count(".") >= 2 else ""
        if kind == "start":
            start = StartReport.from_wire(msg.data)
            _expect(msg.subject, names.report_start(start.worker_id))
            return self.ledger.started(start, now)
        if kind != "done":
            raise InvalidRecord(f"unknown report subject {msg.subject}")
        done = DoneReport.from_wire(msg.data)
        _expect(msg.subject, names.report_done(done.job_id, done.task_id))
        return self.ledger.done(done, now, raw=msg.data)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = Heartbeat.from_wire(msg.data)
            _expect(msg.subject, names.heartbeat_subject(hb.worker_id))
        except ValueError as exc:
            log.warning("ignoring malformed heartbeat on %s: %s", msg.subject, exc)
            return
        known = self.workers.beat(hb, time.monotonic())
        fences = self.ledger.heartbeat_fences(hb)
        if fences:
            log.info("fencing %d deliveries of worker %s", len(fences), hb.worker_id)
        if msg.reply:
            with contextlib.suppress(Exception):
                assert self.nc is not None
                reply = HeartbeatReply(fence=fences, confirmed=self.ledger.confirmed(hb), known=known)
                await self.nc.publish(msg.reply, reply.to_wire())

    async def _on_tokens(self, msg: Msg) -> None:
        """A worker's handlers want rate-limit tokens: a short lease out of the limiter's bucket."""
        try:
            req = TokenRequest.from_wire(msg.data)
            _expect(msg.subject, names.tokens_subject(req.limiter))
        except ValueError as exc:
            log.warning("ignoring malformed token request on %s: %s", msg.subject, exc)
            return
        now = self.clock()
        if req.throttled:
            self.ledger.gate.throttled(req.limiter, now, req.retry_after_s)
            granted, retry_in, reason = 0.0, 0.0, None
        else:
            granted, retry_in, reason = self.ledger.gate.lease(
                req.limiter, req.worker_id, req.want, now, self.s.token_lease_s
            )
        if msg.reply:
            grant = TokenGrant(
                limiter=req.limiter,
                granted=granted,
                lease_s=self.s.token_lease_s,
                retry_in_s=retry_in,
                reason=reason,
            )
            with contextlib.suppress(Exception):
                assert self.nc is not None
                await self.nc.publish(msg.reply, grant.to_wire())


def _still_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed (the task is still being cancelled)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _expect(subject: str, want: str) -> None:
    """The subject and the body must name the same job, task or worker (no spoofing by body)."""
    if subject != want:
        raise InvalidRecord(f"subject {subject} does not match its body (expected {want})")


async def serve(url: str, settings: SchedulerSettings) -> None:
    import gc
    import signal

    # the ledger keeps many small long-lived objects: collect the young generation less often
    # (measured: a quarter less CPU per admitted task at a large backlog)
    gc.set_threshold(50_000, 20, 100)

    sched = Scheduler(url, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sched.stop)
    await sched.run()


__all__ = ["Scheduler", "SchedulerSettings", "serve"]
