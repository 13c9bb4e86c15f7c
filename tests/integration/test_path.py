"""The main path through a real nats-server: submit, schedule, run, report, collect."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from typing import Any

import pytest
from conftest import Stack, WorkerProcs, count, wait_for
from pydantic import ValidationError

from broker import codec, names, reader
from broker.names import InvalidName
from clients.sdk.client import TaskFailed
from fleet.core.records import JobRecord, RetryPolicy, TaskEvent, TaskRecord

NO_RETRY = RetryPolicy(max_attempts=1)
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_s=0.05, jitter=0)


async def test_sweep_of_200_items_in_bundles_of_10(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job("handlers:square", items=range(200), bundle=10, name="squares")

    record = await fleet.wait_job(job, timeout=15)

    assert record.finished and not record.cancelled
    assert record.name == "squares"
    assert record.total == 20 and record.submitted == 20
    assert record.counts == {"succeeded": 20}
    assert record.done == 20
    assert record.retries == 0 and record.requeues == 0
    reports = [(r, v) async for r, v in fleet.results(job)]
    assert len(reports) == 20
    reports.sort(key=lambda rv: rv[0].task_id)
    values: list[int] = []
    for report, value in reports:
        assert report.outcome == "succeeded" and report.error is None
        assert report.items == 10 and report.attempt == 1 and report.delivery == 1
        values += value
    assert values == [i * i for i in range(200)]
    # both workers took part (20 tasks, 2 slots each)
    assert {r.worker_id for r, _ in reports} <= {w.worker_id for w in stack.workers}
    assert sum(w.completed for w in stack.workers) == 20


async def test_single_task_submit_and_result(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:square", 7)

    assert await fleet.result(job, task, timeout=10) == 49
    record = await fleet.wait_job(job, timeout=5)
    assert record.total == 1 and record.counts == {"succeeded": 1}
    state = await fleet.state(job, task)
    assert state is not None and state.state == "succeeded"


async def test_transient_failure_is_retried(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:flaky_once", 6, retry=FAST_RETRY)

    assert await fleet.result(job, task, timeout=10) == 36
    report = await fleet.report(job, task)
    assert report is not None and report.attempt == 2 and report.outcome == "succeeded"
    record = await fleet.wait_job(job, timeout=5)
    assert record.retries == 1 and record.counts == {"succeeded": 1}
    # the first attempt's failure is in the task's history as a retrying state with its reason
    states = await _states(stack, job, task)
    retrying = [e for e in states if e.state == "retrying"]
    assert len(retrying) == 1 and "transient failure on attempt 1" in (retrying[0].reason or "")


async def test_permanent_error_fails_at_once(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:permanent", 42, retry=FAST_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert info.value.state == "failed"
    assert "Permanent" in (info.value.reason or "") and "input 42 can never work" in (info.value.reason or "")
    report = await fleet.report(job, task)
    assert report is not None and report.attempt == 1 and report.error is not None
    assert report.error.retryable is False
    record = await fleet.wait_job(job, timeout=5)
    assert record.retries == 0 and record.counts == {"failed": 1}


async def test_unknown_handler_module_fails_naming_it(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("no_such_module_xyz.sub:run", 1, retry=FAST_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    reason = info.value.reason or ""
    assert "HandlerNotFound" in reason and "no_such_module_xyz" in reason
    record = await fleet.wait_job(job, timeout=5)
    # a handler that cannot be imported can never run: invalid input, dead, never retried
    assert record.retries == 0 and record.counts == {"dead": 1} and record.failures == {"invalid": 1}


async def test_missing_function_in_existing_module_fails_naming_it(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:no_such_function", 1, retry=FAST_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert "no_such_function" in (info.value.reason or "")


async def test_command_task_captures_stdout(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job(command=["python3", "-c", "print({item}*2)"], items=[1, 2, 3, 4], bundle=2)

    record = await fleet.wait_job(job, timeout=15)
    assert record.counts == {"succeeded": 2}
    outputs: list[dict[str, Any]] = []
    for _, value in sorted([(r.task_id, v) async for r, v in fleet.results(job)]):
        outputs += value
    assert [o["stdout"] for o in outputs] == ["2\n", "4\n", "6\n", "8\n"]
    assert all(o["exit_code"] == 0 for o in outputs)


async def test_command_nonzero_exit_fails_with_exit_code(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    argv = ["python3", "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    job, task = await fleet.submit(command=argv, retry=NO_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    reason = info.value.reason or ""
    assert "CommandFailed" in reason and "code 3" in reason and "boom" in reason


async def test_missing_command_binary_fails(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit(command=["/nonexistent/fleet-tool", "x"], retry=NO_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert "/nonexistent/fleet-tool" in (info.value.reason or "")


@pytest.mark.parametrize("handler", ["handlers:sleep_async", "handlers:slow"])
async def test_timeout_fails_the_attempt(stack: Stack, handler: str) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    started = time.monotonic()
    job, task = await fleet.submit(handler, 3.0, timeout_s=0.3, retry=NO_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert time.monotonic() - started < 2.5, "the timeout did not cut the attempt short"
    reason = info.value.reason or ""
    assert "TaskTimeout" in reason and "timeout" in reason


async def test_command_timeout_kills_the_process(stack: Stack, tmp_path: Any) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    pidfile = tmp_path / "pid"
    code = f"import os, time, pathlib; pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid())); time.sleep(20)"
    job, task = await fleet.submit(command=["python3", "-c", code], timeout_s=0.5, retry=NO_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert "timeout" in (info.value.reason or "")
    pid = int(pidfile.read_text())
    try:
        await wait_for(lambda: not _alive(pid), timeout=3, what="the timed-out command to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


async def test_progress_and_log_events_reach_the_client(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job("handlers:chatty", items=[3, 4], bundle=1)

    seen: list[TaskEvent | TaskRecord | JobRecord] = []

    def complete() -> bool:
        logs = {e.message for e in seen if isinstance(e, TaskEvent) and e.kind == "log"}
        progress = [e for e in seen if isinstance(e, TaskEvent) and e.kind == "progress"]
        finished = any(isinstance(e, JobRecord) and e.finished for e in seen)
        return finished and bool(progress) and {"hello from item 3", "hello from item 4"} <= logs

    async def collect() -> None:
        async for event in fleet.events(job):
            seen.append(event)
            if complete():
                return

    try:
        await asyncio.wait_for(collect(), 10)
    except TimeoutError:
        pytest.fail(f"events incomplete: {[(type(e).__name__, getattr(e, 'kind', '')) for e in seen]}")
    logs = [e for e in seen if isinstance(e, TaskEvent) and e.kind == "log"]
    assert all(e.level == "info" and e.attempt == 1 for e in logs)
    assert {e.task_id for e in logs} == {"t0000000", "t0000001"}
    progress = [e for e in seen if isinstance(e, TaskEvent) and e.kind == "progress"]
    assert all(0.0 <= (e.progress or 0) <= 1.0 for e in progress)
    assert any(e.message and e.message.startswith("half way through") for e in progress) or any(
        e.progress == 1.0 for e in progress
    )
    states = [str(e.state) for e in seen if isinstance(e, TaskRecord)]
    assert states.count("dispatched") == 2 and states.count("running") == 2 and states.count("succeeded") == 2


async def test_large_input_is_offloaded_and_round_trips(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    data = os.urandom(3 * 1024 * 1024)

    job, task = await fleet.submit("handlers:echo", data)
    value = await fleet.result(job, task, timeout=15)

    assert isinstance(value, bytes) and value == data
    # both the input and the result travelled through the object store, not inline
    raw, _, _ = codec.encode_value({"args": [data], "kwargs": {}})
    store = await fleet.js.object_store(names.BLOBS_BUCKET)
    info = await store.get_info(names.blob_name(job, codec.content_ref(raw)))  # scoped to its job
    assert info.size == len(raw)
    report = await fleet.report(job, task)
    assert report is not None and report.result is not None
    assert report.result.ref is not None and report.result.data is None

    job2, task2 = await fleet.submit("handlers:digest", data)
    assert await fleet.result(job2, task2, timeout=15) == {
        "len": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


async def test_unserializable_result_fails_clearly(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:unserializable", retry=FAST_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert "ResultNotSerializable" in (info.value.reason or "")


async def test_cancel_job_with_queued_slow_tasks(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job("handlers:slow_item", items=range(40), bundle=1, kwargs={"seconds": 5.0})

    async def running() -> JobRecord | None:
        rec = await fleet.job(job)
        return rec if rec is not None and rec.counts.get("running", 0) >= 4 and rec.submitted == 40 else None

    await wait_for(running, timeout=10, what="4 tasks running")
    cancelled_at = time.monotonic()
    await fleet.cancel(job, reason="enough")

    record = await fleet.wait_job(job, timeout=10)
    assert time.monotonic() - cancelled_at < 5
    assert record.finished and record.cancelled
    assert record.counts == {"cancelled": 40}
    assert record.done == 40

    # queued work is purged from the task stream (right after the states that say so are stored)
    # and running work is stopped on the workers
    async def purged() -> bool:
        return await count(fleet.js, names.TASKS_STREAM, names.job_tasks_filter(job)) == 0

    await wait_for(purged, timeout=5, what="queued work purged")
    await wait_for(lambda: all(not w.running for w in stack.workers), timeout=5, what="workers idle")
    state = await fleet.state(job, "t0000039")
    assert state is not None and state.state == "cancelled" and state.reason == "enough"
    # the workers are free again: new work runs
    job2, task2 = await fleet.submit("handlers:square", 5)
    assert await fleet.result(job2, task2, timeout=10) == 25


async def test_retries_are_exhausted_then_the_task_fails(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:always_fails", 1, retry=FAST_RETRY)

    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=10)
    assert "every time" in (info.value.reason or "")
    report = await fleet.report(job, task)
    assert report is not None and report.attempt == 3
    record = await fleet.wait_job(job, timeout=5)
    assert record.retries == 2 and record.counts == {"failed": 1}


async def test_cancel_one_task_of_a_job(stack: Stack) -> None:
    await stack.up(workers=1, concurrency=1)
    fleet = stack.client
    job = await fleet.submit_job("handlers:slow_item", items=[0, 1, 2], bundle=1, kwargs={"seconds": 0.5})

    async def first_running() -> bool:
        ev = await fleet.state(job, "t0000000")
        return ev is not None and ev.state == "running"

    await wait_for(first_running, timeout=10, what="first task running")
    await fleet.cancel(job, "t0000002", reason="not this one")
    record = await fleet.wait_job(job, timeout=10)

    assert record.counts == {"succeeded": 2, "cancelled": 1} and not record.cancelled
    state = await fleet.state(job, "t0000002")
    assert state is not None and state.state == "cancelled" and state.reason == "not this one"
    assert await fleet.report(job, "t0000002") is None, "the cancelled queued task still ran"


async def test_cancel_a_running_task_stops_it(stack: Stack) -> None:
    await stack.up(workers=1, concurrency=1)
    fleet = stack.client
    job, task = await fleet.submit("handlers:slow", 8.0)
    worker = stack.workers[0]
    await wait_for(lambda: worker.running, timeout=10, what="task running")

    await fleet.cancel(job, task)
    with pytest.raises(TaskFailed) as info:
        await fleet.result(job, task, timeout=5)
    assert info.value.state == "cancelled"
    await wait_for(lambda: not worker.running, timeout=3, what="the worker to drop the task")
    assert await fleet.report(job, task) is None, "a cancelled task has no accepted outcome"
    record = await fleet.wait_job(job, timeout=5)
    assert record.finished and record.counts == {"cancelled": 1}


async def test_named_queue_is_served_by_its_own_workers(stack: Stack) -> None:
    await stack.up(workers=1, queue="gpu")
    await stack.start_worker(queue="default")
    fleet = stack.client
    job = await fleet.submit_job("handlers:square", items=range(6), bundle=2, queue="gpu")

    record = await fleet.wait_job(job, timeout=10)
    assert record.queue == "gpu" and record.counts == {"succeeded": 3}
    gpu_worker = next(w for w in stack.workers if w.s.queue == "gpu")
    assert {r.worker_id async for r, _ in fleet.results(job)} == {gpu_worker.worker_id}


async def test_resubmitting_the_same_job_is_deduplicated(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job("handlers:square", items=range(20), bundle=2, job_id="same-job")
    again = await fleet.submit_job("handlers:square", items=range(20), bundle=2, job_id="same-job")
    assert again == job == "same-job"

    record = await fleet.wait_job(job, timeout=10)
    assert record.total == 10 and record.submitted == 10 and record.counts == {"succeeded": 10}
    await asyncio.sleep(0.3)  # a duplicate, had it been admitted, would have run by now
    assert sum(w.completed for w in stack.workers) == 10


async def test_cancel_during_retry_backoff(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    slow_retry = RetryPolicy(max_attempts=3, backoff_s=1.5, jitter=0)
    job, task = await fleet.submit("handlers:always_fails", 1, retry=slow_retry)

    async def retrying() -> bool:
        ev = await fleet.state(job, task)
        return ev is not None and ev.state == "retrying"

    await wait_for(retrying, timeout=10, what="task waiting for its retry")
    await fleet.cancel(job)
    record = await fleet.wait_job(job, timeout=3)
    assert record.cancelled and record.counts == {"cancelled": 1} and record.retries == 1

    # the retry's timer comes due, finds the task cancelled, and dispatches nothing
    await asyncio.sleep(1.6)
    assert await count(fleet.js, names.TASKS_STREAM, names.job_tasks_filter(job)) == 0
    state = await fleet.state(job, task)
    assert state is not None and state.state == "cancelled" and state.attempt == 2 and state.dispatch == 1
    assert await fleet.report(job, task) is None
    assert stack.workers[0].completed == 1 and not stack.workers[0].running


async def test_empty_job_finishes_at_once(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    job = await fleet.submit_job("handlers:square", items=[], bundle=5)
    record = await fleet.wait_job(job, timeout=5)
    assert record.total == 0 and record.counts == {} and record.finished


async def test_invalid_ids_are_refused_by_the_client(stack: Stack) -> None:
    await stack.up(workers=0)
    fleet = stack.client
    with pytest.raises(InvalidName):
        await fleet.submit_job("handlers:square", items=[1], job_id="has.dot")
    with pytest.raises(InvalidName):
        await fleet.submit("handlers:square", 1, job_id="a*b")
    with pytest.raises(ValidationError):
        await fleet.submit("not-a-handler", 1)


async def test_process_executor_worker(stack: Stack, spawn_worker: WorkerProcs) -> None:
    await stack.start_scheduler()
    fleet = await stack.connect()
    proc = spawn_worker(stack.url, "--executor", "process", concurrency=2)
    job = await fleet.submit_job("handlers:square", items=range(20), bundle=5)

    record = await fleet.wait_job(job, timeout=20)
    assert proc.poll() is None
    assert record.counts == {"succeeded": 4}
    values = [x for _, v in sorted([(r.task_id, v) async for r, v in fleet.results(job)]) for x in v]
    assert values == [i * i for i in range(20)]


# -- helpers ---------------------------------------------------------------------------------------
async def _states(stack: Stack, job: str, task: str) -> list[TaskRecord]:
    out: list[TaskRecord] = []
    subject = names.event_subject(job, task, names.EVENT_STATE)
    async for msg in reader.replay(stack.client.js, names.EVENTS_STREAM, subject):
        out.append(TaskRecord.from_wire(msg.data))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
