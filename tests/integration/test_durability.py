"""The state of record outlives any age limit, and nothing the scheduler decides is lost.

* a task still running after 10 days of the scheduler's clock, and a task that waited in the queue
  past the old 72 h window, both survive a scheduler restart and finish;
* with publish failures injected at every effect point (FLEET_FAULTS), every task still ends
  terminal with correct counts;
* a job whose last task became terminal just before a crash is finished by recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from conftest import FLUSH_S, Stack, wait_for

from broker import names
from fleet.core.records import RetryPolicy
from fleet.core.states import TaskState
from fleet.scheduler.service import Scheduler, SchedulerSettings

DAY = 24 * 3600.0


def _clock(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


async def _scheduler(stack: Stack, offset: float = 0.0) -> tuple[Scheduler, asyncio.Task[None]]:
    sched = Scheduler(stack.url, SchedulerSettings(flush_s=FLUSH_S), clock=_clock(offset))
    task = asyncio.ensure_future(sched.run())
    await asyncio.wait_for(sched.ready.wait(), 15)
    return sched, task


async def _stop(sched: Scheduler, task: asyncio.Task[None]) -> None:
    sched.stop()
    await asyncio.wait_for(task, 10)


async def test_records_have_no_age_limit(stack: Stack) -> None:
    sched, task = await _scheduler(stack)
    try:
        js = (await stack.connect()).js
        for stream in (names.INTAKE_STREAM, names.STATE_STREAM, names.RESULTS_STREAM):
            cfg = (await js.stream_info(stream)).config
            assert not cfg.max_age and (cfg.max_bytes or -1) < 0, f"{stream} must not expire records"
        kv = await js.key_value(names.JOBS_BUCKET)
        assert not (await kv.status()).ttl, "job records must not expire"
        events = (await js.stream_info(names.EVENTS_STREAM)).config
        assert events.max_age and events.max_bytes and events.max_bytes > 0, "history is bounded by both"
    finally:
        await _stop(sched, task)


async def test_task_queued_past_72_hours_survives_a_restart(stack: Stack) -> None:
    sched, task = await _scheduler(stack)
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:square", items=range(6), bundle=2)

    async def queued() -> bool:  # no worker: they wait in the room (no task records yet)
        record = await fleet.job(job)
        return record is not None and record.counts == {"queued": 3} and record.waiting is not None

    await wait_for(queued, timeout=10, what="3 queued tasks")
    assert (await fleet.job(job)).waiting == "no workers for queue default"  # type: ignore[union-attr]
    await _stop(sched, task)

    sched, task = await _scheduler(stack, offset=73 * 3600.0)  # three days and an hour later
    try:
        assert sched.ledger.jobs[job].counts == {TaskState.QUEUED: 3}  # read back from the task store
        await stack.start_worker()
        record = await fleet.wait_job(job, timeout=15)
        assert record.counts == {"succeeded": 3}
        values = sorted(x for _, v in [(r, v) async for r, v in fleet.results(job)] for x in v)
        assert values == [i * i for i in range(6)]
    finally:
        await _stop(sched, task)


async def test_task_running_for_10_days_survives_a_restart(stack: Stack) -> None:
    sched, task = await _scheduler(stack)
    fleet = await stack.connect()
    worker = await stack.start_worker(concurrency=1)
    job, task_id = await fleet.submit("handlers:slow", 3.0)
    await wait_for(lambda: _all_in(fleet, job, TaskState.RUNNING, 1), timeout=10, what="running")
    await _stop(sched, task)

    sched, task = await _scheduler(stack, offset=10 * DAY)
    try:
        entry = sched.ledger.task(job, task_id)
        assert entry is not None and entry.state == TaskState.RUNNING and entry.worker == worker.worker_id
        assert await fleet.result(job, task_id, timeout=15) == 3.0
        record = await fleet.wait_job(job, timeout=5)
        assert record.counts == {"succeeded": 1} and record.requeues == 0 and record.stale_reports == 0
    finally:
        await _stop(sched, task)


@pytest.mark.parametrize(
    "faults", ["dispatch=0.3,result=0.3,dlq=0.3", "state=0.3,job=0.3", "delete=0.5,purge=0.5,dispatch=0.2"]
)
async def test_injected_publish_failures_lose_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, faults: str
) -> None:
    monkeypatch.setenv("FLEET_FAULTS", faults)
    monkeypatch.setenv("FLEET_FAULTS_SEED", "7")
    await stack.up(workers=2)
    fleet = stack.client
    ok = await fleet.submit_job("handlers:square", items=range(40), bundle=2)
    flaky = await fleet.submit_job(
        "handlers:flaky_once", items=range(6), bundle=1, retry=RetryPolicy(max_attempts=3, backoff_s=0.05)
    )
    bad = await fleet.submit_job("handlers:permanent", items=range(3), bundle=1)
    doomed = await fleet.submit_job("handlers:slow_item", items=range(6), bundle=1, kwargs={"seconds": 5})
    await fleet.cancel(doomed)

    assert (await fleet.wait_job(ok, timeout=30)).counts == {"succeeded": 20}
    assert (await fleet.wait_job(flaky, timeout=30)).counts == {"succeeded": 6}
    assert (await fleet.wait_job(bad, timeout=30)).counts == {"failed": 3}
    assert (await fleet.wait_job(doomed, timeout=30)).counts == {"cancelled": 6}
    for job in (ok, flaky, bad, doomed):
        states = [r.state async for r in fleet.tasks(job)]
        record = await fleet.job(job)
        assert record is not None and sum(record.counts.values()) == len(states)
        assert all(s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED) for s in states)
    assert stack.scheduler is not None and stack.scheduler.faults.injected > 0, "no fault was injected"


async def test_recovery_finishes_a_job_whose_last_task_ended_before_the_crash(stack: Stack) -> None:
    sched, task = await _scheduler(stack)
    fleet = await stack.connect()
    await stack.start_worker()
    job = await fleet.submit_job("handlers:square", items=range(4), bundle=1)
    await fleet.wait_job(job, timeout=10)
    # simulate a crash between the last task's state and its job record: an unfinished record
    kv = await fleet.js.key_value(names.JOBS_BUCKET)
    stale = sched.ledger.jobs[job].record().model_copy(update={"finished_at": None, "counts": {"running": 4}})
    await _stop(sched, task)
    await kv.put(job, stale.to_wire())
    assert (await fleet.job(job)).finished_at is None  # type: ignore[union-attr]

    sched, task = await _scheduler(stack)
    try:
        record = await fleet.wait_job(job, timeout=10)
        assert record.counts == {"succeeded": 4}
    finally:
        await _stop(sched, task)


async def _all_in(fleet: object, job: str, state: TaskState, n: int) -> bool:
    states = [r.state async for r in fleet.tasks(job)]  # type: ignore[attr-defined]
    return len(states) == n and all(s == state for s in states)


async def test_inputs_a_dead_scheduler_held_come_back_at_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler stuck on its effects (here: every dispatch fails) holds a batch unacknowledged;
    its successor gets that batch at once (consumer reset), not after the 60 s AckWait."""
    monkeypatch.setenv("FLEET_FAULTS", "dispatch=2.0")  # every dispatch attempt fails
    sched, task = await _scheduler(stack)
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:square", items=range(10), bundle=1)

    async def stuck() -> bool:
        info = await fleet.js.consumer_info(names.INTAKE_STREAM, names.INTAKE_CONSUMER)
        return (info.num_ack_pending or 0) > 0

    await wait_for(stuck, timeout=10, what="the first scheduler holding the submissions")
    task.cancel()  # dies without acknowledging anything
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.delenv("FLEET_FAULTS")

    started = time.monotonic()
    sched, task = await _scheduler(stack)
    try:
        await stack.start_worker()
        record = await fleet.wait_job(job, timeout=20)
        assert record.counts == {"succeeded": 10}
        assert time.monotonic() - started < 15, "the held inputs waited for their AckWait"
    finally:
        await _stop(sched, task)
