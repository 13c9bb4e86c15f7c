"""Carrying out the ledger's effects, durably and in order (the scheduler's write path).

Three phases per round, each waited for before the next (``fleet.core.effects``): what state
depends on (dispatches, results, dead letters), then the state of record and job records, then
what follows state (deletes of old deliveries, purges, broadcasts, archives). A transient failure
is retried with backoff until it succeeds, with the same de-duplication ids, so nothing the ledger
decided is dropped; the caller acknowledges its inputs only afterwards. A permanent refusal of one
dispatch (the server will never store it) ends that task dead instead of wedging the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError

from broker import names
from broker.publisher import Out, Publisher, PublishError
from fleet.core.effects import (
    BEFORE_STATE,
    Archive,
    Broadcast,
    DeleteDispatch,
    Dispatch,
    Effect,
    Publish,
    Purge,
    SaveResult,
)
from fleet.core.ledger import Ledger
from fleet.core.records import JobRecord, TaskEnvelope
from fleet.scheduler.faults import Faults

log = logging.getLogger("fleet.scheduler")
T = TypeVar("T")
ENVELOPE_READS = 256
"""Envelopes read from the task store at once (a requeue of many tasks is not one read at a time)."""
STATE_WINDOW = 2000
"""State records per publish window (a cancel of a million tasks goes out in slices)."""


class Applier:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        pub: Publisher,
        ledger: Ledger,
        clock: Callable[[], float],
        faults: Faults | None = None,
        on_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.nc, self.js, self.pub, self.ledger, self.clock = nc, js, pub, ledger, clock
        self.faults = faults or Faults()
        self.on_retry = on_retry
        self.job_revs: dict[str, int] = {}
        self.errors = 0
        self.kv: Any = None

    async def durably(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it succeeds; transient errors are retried with backoff, for ever."""
        delay = 0.05
        while True:
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
                if self.on_retry is not None:
                    await self.on_retry()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def apply(self, effects: Sequence[Effect]) -> None:
        before = [e for e in effects if isinstance(e, BEFORE_STATE)]
        after = [e for e in effects if not isinstance(e, BEFORE_STATE)]
        if before:
            await self._before(before)
        await self.flush_records()
        for eff in after:
            await self.durably(f"effect {type(eff).__name__}", lambda e=eff: self._after(e))  # type: ignore[misc]

    # -- phase 1 ---------------------------------------------------------------------------------
    async def _before(self, effects: Sequence[Effect]) -> None:
        outs, points = await self._outs(effects)
        pending = list(range(len(outs)))
        while pending:
            idx = pending
            results = await self.durably("publishing", lambda i=idx: self._publish(outs, points, i))  # type: ignore[misc]
            pending = []
            for i, res in zip(idx, results, strict=True):
                if not isinstance(res, PublishError):
                    if points[i] == "dispatch":
                        self._fed_back(outs[i], res.seq)
                elif res.transient:
                    pending.append(i)
                else:
                    self._refused(outs[i], res)
            if pending:
                self.errors += 1
                log.warning("%d effects not confirmed; retrying", len(pending))
                if self.on_retry is not None:
                    await self.on_retry()
                await asyncio.sleep(0.1)

    async def _outs(self, effects: Sequence[Effect]) -> tuple[list[Out], list[str]]:
        dispatches = [e for e in effects if isinstance(e, Dispatch)]
        ready: dict[int, Out | None] = {}
        for i in range(0, len(dispatches), ENVELOPE_READS):  # requeues and retries read their envelopes
            part = dispatches[i : i + ENVELOPE_READS]
            got = await self.durably("reading envelopes", functools.partial(self._dispatch_outs, part))
            ready.update((id(d), out) for d, out in zip(part, got, strict=True))
        outs: list[Out] = []
        points: list[str] = []
        for eff in effects:
            if isinstance(eff, Dispatch):
                out = ready[id(eff)]
                if out is not None:
                    outs.append(out)
                    points.append("dispatch")
            elif isinstance(eff, SaveResult):
                msg_id = names.msgid_result(eff.job_id, eff.task_id, eff.attempt)
                outs.append(Out(names.result_subject(eff.job_id, eff.task_id), eff.raw, msg_id))
                points.append("result")
            elif isinstance(eff, Publish):
                outs.append(Out(eff.subject, eff.record.to_wire(), eff.msg_id))
                points.append("dlq")
        return outs, points

    async def _publish(self, outs: list[Out], points: list[str], idx: list[int]) -> list[Any]:
        kinds = sorted({points[i] for i in idx})
        for point in kinds:
            self.faults.before(point)
        results = await self.pub.publish_each([outs[i] for i in idx])
        for point in kinds:
            self.faults.after(point)
        return results

    async def _dispatch_outs(self, part: list[Dispatch]) -> list[Out | None]:
        return list(await asyncio.gather(*map(self._dispatch_out, part)))

    async def _dispatch_out(self, d: Dispatch) -> Out | None:
        env = d.envelope
        if env is None:
            try:
                if d.intake_seq is not None:
                    raw = await self.js.get_msg(names.INTAKE_STREAM, seq=d.intake_seq, direct=True)
                else:
                    raw = await self.js.get_last_msg(
                        names.INTAKE_STREAM, names.intake_task(d.job_id, d.task_id)
                    )
                env = TaskEnvelope.from_wire(raw.data or b"")
            except (NotFoundError, ValueError) as exc:
                log.error(
                    "task %s/%s cannot be dispatched: its envelope is gone (%s)", d.job_id, d.task_id, exc
                )
                self.ledger.reject(
                    d.job_id, d.task_id, f"envelope missing from the task store: {exc}", self.clock()
                )
                return None
        if env.payload.ref:
            self.ledger.add_blob(d.job_id, d.task_id, names.blob_name(d.job_id, env.payload.ref))
        body = env.model_copy(update={"attempt": d.attempt, "not_before": None}).to_wire()
        headers = {names.HDR_ATTEMPT: str(d.attempt), names.HDR_DISPATCH: str(d.dispatch)}
        msg_id = names.msgid_dispatch(d.job_id, d.task_id, d.attempt, d.dispatch)
        return Out(names.task_subject(d.queue, d.job_id, d.task_id), body, msg_id, headers)

    def _fed_back(self, out: Out, seq: int) -> None:
        job_id, task_id = names.task_of(out.subject)
        dispatch = int((out.headers or {}).get(names.HDR_DISPATCH, "0"))
        if job_id and task_id:
            self.ledger.dispatched(job_id, task_id, dispatch, seq)

    def _refused(self, out: Out, err: PublishError) -> None:
        log.error("server refused %s for good: %s", out.subject, err)
        job_id, task_id = names.task_of(out.subject)
        if job_id and task_id and out.subject.startswith(names.PREFIX + ".task."):
            self.ledger.reject(job_id, task_id, f"cannot be dispatched: {err}", self.clock())

    # -- phase 2 ---------------------------------------------------------------------------------
    async def flush_records(self) -> None:
        while True:
            records = self.ledger.take_states(self.clock(), limit=STATE_WINDOW)
            if not records:
                break
            outs = [
                Out(
                    names.state_subject(r.job_id, r.task_id),
                    r.to_wire(),
                    names.msgid_state(r.job_id, r.task_id, r.rev),
                )
                for r in records
            ]
            await self.durably("writing task states", lambda o=outs: self._states(o))  # type: ignore[misc]
            await asyncio.sleep(0)  # let heartbeats in between slices
        jobs = self.ledger.take_jobs()
        for i in range(0, len(jobs), 256):
            part = jobs[i : i + 256]
            await self.durably("writing job records", lambda p=part: self._jobs(p))  # type: ignore[misc]

    async def _states(self, outs: list[Out]) -> None:
        self.faults.before("state")
        await self.pub.publish_many(outs)
        self.faults.after("state")

    async def _jobs(self, records: list[JobRecord]) -> None:
        self.faults.before("job")
        if self.kv is None:
            self.kv = await self.js.key_value(names.JOBS_BUCKET)
        await asyncio.gather(*(self._put_job(r) for r in records))
        for r in records:
            await self.pub.fire(names.job_event_subject(r.job_id), r.to_wire())
        self.faults.after("job")

    async def _put_job(self, record: JobRecord) -> None:
        """Compare-and-set on the last revision this scheduler wrote, so nothing older overwrites it."""
        data = record.to_wire()
        rev = self.job_revs.get(record.job_id)
        try:
            if rev is None:
                self.job_revs[record.job_id] = await self.kv.create(record.job_id, data)
            else:
                self.job_revs[record.job_id] = await self.kv.update(record.job_id, data, last=rev)
        except KeyWrongLastSequenceError:
            # written before a restart (no revision known yet), or our last write landed but its
            # answer was lost: take the stored revision and write again
            current = await self.kv.get(record.job_id)
            self.job_revs[record.job_id] = await self.kv.update(record.job_id, data, last=current.revision)

    # -- phase 3 ---------------------------------------------------------------------------------
    async def _after(self, eff: Effect) -> None:
        if isinstance(eff, DeleteDispatch):
            self.faults.before("delete")
            await self._delete(eff.seq)
            self.faults.after("delete")
        elif isinstance(eff, Purge):
            self.faults.before("purge")
            await self.js.purge_stream(eff.stream, subject=eff.subject)
            self.faults.after("purge")
        elif isinstance(eff, Broadcast):
            await self.nc.publish(eff.subject, eff.record.to_wire())
        elif isinstance(eff, Archive):
            await self._archive(eff)

    async def _delete(self, seq: int) -> None:
        try:
            await self.js.delete_msg(names.TASKS_STREAM, seq)
        except Exception as exc:
            if "no message found" not in str(exc).lower() and not isinstance(exc, NotFoundError):
                raise

    async def _archive(self, eff: Archive) -> None:
        self.faults.before("archive")
        job = eff.job_id
        purges = [(names.INTAKE_STREAM, f) for f in names.job_intake_filters(job)] + [
            (names.TASKS_STREAM, names.job_tasks_filter(job)),
            (names.STATE_STREAM, names.job_state_filter(job)),
            (names.RESULTS_STREAM, names.job_results_filter(job)),
            (names.EVENTS_STREAM, names.job_events_filter(job)),
            (names.DLQ_STREAM, names.job_dlq_filter(job)),
        ]
        for stream, subject in purges:
            await self.js.purge_stream(stream, subject=subject)
        if eff.blobs:
            store = await self.js.object_store(names.BLOBS_BUCKET)
            for name in eff.blobs:
                with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                    await store.delete(name)
        if self.kv is None:
            self.kv = await self.js.key_value(names.JOBS_BUCKET)
        await self.kv.purge(job)
        self.job_revs.pop(job, None)
        self.ledger.archived(job)
        log.info("archived job %s", job)
