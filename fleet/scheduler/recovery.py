"""Rebuilding the ledger after a restart: one pass over the job records, one over the state of record.

1. Every job record (KV ``fleet_jobs``), read with one last-per-subject consumer.
2. Every task's state of record (``fleet.state.>``), read with one last-per-subject consumer: no
   consumer per job, no age limit, so a task that has run for ten days or waited past any history
   window is still there.
3. Jobs with task records but no job record get their declaration back from the task store.
4. Tasks of unfinished jobs that never left the waiting room have no record: their envelopes are
   read back from the task store (``fleet.intake.task.<job>.*``) and admitted again.
5. ``Ledger.after_restore``: what each tenant holds is counted, holders indexed, timers re-armed,
   waiting tasks put back in the waiting room, and every job's completion re-checked.

Workers that held tasks are then *seeded* into the liveness table by the caller: if they do not
heartbeat within the usual deadline, their tasks are requeued (a worker that died while the
scheduler was down is noticed soon after it comes back).
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker import names, reader
from fleet.core.effects import Effect
from fleet.core.ledger import Ledger
from fleet.core.records import JobRecord, JobSpec, TaskEnvelope, TaskRecord

log = logging.getLogger("fleet.scheduler")


async def recover(js: JetStreamContext, ledger: Ledger, now: float) -> list[Effect]:
    started = time.monotonic()
    jobs = 0
    async for msg in reader.replay(js, names.JOBS_KV_STREAM, names.JOBS_KV_SUBJECTS, last_per_subject=True):
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            continue
        try:
            ledger.restore_job(JobRecord.from_wire(msg.data))
            jobs += 1
        except ValueError as exc:
            log.warning("skipping unreadable job record on %s: %s", msg.subject, exc)
    tasks = 0
    async for msg in reader.replay(js, names.STATE_STREAM, names.STATE_SUBJECTS, last_per_subject=True):
        try:
            ledger.restore_task(TaskRecord.from_wire(msg.data))
            tasks += 1
        except ValueError as exc:
            log.warning("skipping unreadable task record on %s: %s", msg.subject, exc)
    for job in list(ledger.jobs.values()):
        if not job.declared:
            try:
                raw = await js.get_last_msg(names.INTAKE_STREAM, names.intake_job(job.job_id))
                job.apply_spec(JobSpec.from_wire(raw.data or b""))
            except (NotFoundError, ValueError):
                pass  # tasks submitted without a declaration: the total stays unknown
    waiting = 0
    for job in list(ledger.jobs.values()):
        if job.finished_at is None:
            waiting += await _readmit(js, ledger, job.job_id, now)
    effects = ledger.after_restore(now)
    if jobs or tasks:
        log.info(
            "recovered %d jobs, %d task records and %d waiting tasks in %.2fs",
            jobs,
            tasks,
            waiting,
            time.monotonic() - started,
        )
    return effects


async def _readmit(js: JetStreamContext, ledger: Ledger, job_id: str, now: float) -> int:
    """Admit again the job's submissions that have no record (they were waiting, never dispatched)."""
    job = ledger.jobs[job_id]
    n = 0
    async for msg in reader.replay(js, names.INTAKE_STREAM, names.job_intake_filters(job_id)[1]):
        _, task_id = names.task_of(msg.subject)
        if task_id is None or task_id in job.tasks:
            continue
        try:
            env = TaskEnvelope.from_wire(msg.data)
        except ValueError:
            continue  # it was dead-lettered when it first came in
        ledger.admit(env, now, intake_seq=msg.metadata.sequence.stream)
        n += 1
    return n


async def reload_job(js: JetStreamContext, ledger: Ledger, job_id: str) -> None:
    """Bring a pruned job's task entries back into memory (a retry request needs them)."""
    records = []
    async for msg in reader.replay(
        js, names.STATE_STREAM, names.job_state_filter(job_id), last_per_subject=True
    ):
        records.append(TaskRecord.from_wire(msg.data))
    ledger.reload(job_id, records)


async def lookup_task(js: JetStreamContext, ledger: Ledger, job_id: str, task_id: str) -> None:
    """A submission for a pruned job: load the task's record, if any, so a redelivered submission
    of a finished task is recognised as a duplicate."""
    try:
        raw = await js.get_last_msg(names.STATE_STREAM, names.state_subject(job_id, task_id))
    except NotFoundError:
        return
    ledger.reload(job_id, [TaskRecord.from_wire(raw.data or b"")], keep_pruned=True)


async def release_inputs(js: JetStreamContext) -> None:
    """Inputs a previous scheduler held unacknowledged come back at once, not after their AckWait
    (consumer reset, nats-server 2.14+; the ledger ignores what it already applied)."""
    for stream, consumer in (
        (names.INTAKE_STREAM, names.CONTROL_CONSUMER),
        (names.INTAKE_STREAM, names.INTAKE_CONSUMER),
        (names.REPORTS_STREAM, names.REPORTS_CONSUMER),
    ):
        try:
            info = await js.consumer_info(stream, consumer)
            if info.num_ack_pending:
                await js.reset_consumer(stream, consumer)
                log.info("redelivering %d inputs left in flight on %s", info.num_ack_pending, consumer)
        except Exception as exc:  # an older server: they come back after their AckWait instead
            log.warning("could not reset consumer %s: %s", consumer, exc)


async def check_limits(js: JetStreamContext) -> None:
    """Say loudly when a queue consumer reaches JetStream's limits: past max_ack_pending nothing more
    is delivered, and past max_waiting workers' pulls fail as if the queue were empty."""
    try:
        infos = await js.consumers_info(names.TASKS_STREAM)
    except Exception as exc:
        log.debug("cannot list queue consumers: %s", exc)
        return
    for ci in infos:
        cfg = ci.config
        if cfg.max_ack_pending and (ci.num_ack_pending or 0) >= 0.9 * cfg.max_ack_pending:
            log.error(
                "queue consumer %s holds %d unacknowledged tasks of its max_ack_pending %d: delivery stalls "
                "at the limit (raise BusConfig.max_inflight)",
                ci.name,
                ci.num_ack_pending,
                cfg.max_ack_pending,
            )
        if cfg.max_waiting and (ci.num_waiting or 0) >= 0.9 * cfg.max_waiting:
            log.error(
                "queue consumer %s has %d waiting pulls of its max_waiting %d: more workers' pulls will "
                "look like an empty queue (raise BusConfig.max_waiting)",
                ci.name,
                ci.num_waiting,
                cfg.max_waiting,
            )
