"""Leases, heartbeats and crash recovery: long tasks, kill -9 of a worker, scheduler restarts.

The scheduler requeues a dead worker's tasks ~2.5 heartbeat intervals after its last heartbeat,
as new messages (a new dispatch: delivery 1 of a new sequence, the same attempt), whatever the
lease; the lease (AckWait) is only the backstop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import handlers
from conftest import LEASE_S, Stack, WorkerProcs, count, wait_for
from nats.aio.msg import Msg

from broker import names, reader
from fleet.core import fencing
from fleet.core.records import Heartbeat, RetryPolicy, TaskRecord


async def test_task_longer_than_lease_runs_once_on_one_worker(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    key = f"long-{os.getpid()}-{time.monotonic_ns()}"
    job, task = await fleet.submit("handlers:counted", key, 3 * LEASE_S)

    value = await fleet.result(job, task, timeout=12)

    assert value == {"key": key, "delivery": 1}
    assert handlers.CALLS[key] == 1, "the task ran more than once"
    report = await fleet.report(job, task)
    assert report is not None and report.delivery == 1 and report.attempt == 1
    assert report.finished_at - report.started_at >= 3 * LEASE_S - 0.1
    record = await fleet.wait_job(job, timeout=5)
    assert record.requeues == 0 and record.retries == 0 and record.counts == {"succeeded": 1}
    state = await fleet.state(job, task)
    assert state is not None and state.state == "succeeded" and state.dispatch == 1
    assert state.token == report.token and fencing.delivery_of(report.token) == 1
    assert await count(fleet.js, names.RESULTS_STREAM, names.result_subject(job, task)) == 1


async def test_killed_worker_subprocess_tasks_rerun_elsewhere(
    stack: Stack, spawn_worker: WorkerProcs
) -> None:
    await stack.start_scheduler()
    fleet = await stack.connect()
    beats: dict[int, Heartbeat] = {}

    async def on_beat(msg: Msg) -> None:
        hb = Heartbeat.from_wire(msg.data)
        beats[hb.pid] = hb

    sub = await fleet.nc.subscribe(names.HEARTBEATS, cb=on_beat)
    try:
        # a long lease: the requeue must come from the missed heartbeats, not from the lease
        proc = spawn_worker(stack.url, "--lease", "30", concurrency=2)
        await wait_for(
            lambda: proc.pid in beats or _exited(proc), timeout=15, what="worker subprocess heartbeat"
        )
        info = await fleet.js.consumer_info(names.TASKS_STREAM, names.queue_consumer("default"))
        assert info.config.ack_wait == 30
        assert proc.poll() is None, _log_tail(proc)

        job = await fleet.submit_job(
            "handlers:slow_item", items=["a", "b"], bundle=1, kwargs={"seconds": 2.0}
        )
        await wait_for(
            lambda: len(beats[proc.pid].held) == 2, timeout=10, what="subprocess holding both tasks"
        )
        rescuer = await stack.start_worker(concurrency=2)

        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait()

        record = await fleet.wait_job(job, timeout=15)
    finally:
        await sub.unsubscribe()

    assert record.counts == {"succeeded": 2}
    assert record.requeues == 2
    assert sorted([v async for _, v in fleet.results(job)]) == [["a"], ["b"]]
    for task in ("t0000000", "t0000001"):
        report = await fleet.report(job, task)
        assert report is not None and report.worker_id == rescuer.worker_id and report.attempt == 1
        state = await fleet.state(job, task)
        assert state is not None and state.dispatch == 2 and state.lost == 1 and state.token == report.token
        rerun = [e for e in await _states(stack, job, task) if e.state == "running" and e.at > killed_at]
        assert rerun, "no running state after the kill"
        assert rerun[0].at - killed_at < 3.5, f"re-run {rerun[0].at - killed_at:.1f}s after the kill"
        assert rerun[0].worker_id == rescuer.worker_id


async def test_killed_worker_tasks_taken_over_by_second_subprocess(
    stack: Stack, spawn_worker: WorkerProcs
) -> None:
    await stack.start_scheduler()
    fleet = await stack.connect()
    beats: dict[int, Heartbeat] = {}

    async def on_beat(msg: Msg) -> None:
        hb = Heartbeat.from_wire(msg.data)
        beats[hb.pid] = hb

    sub = await fleet.nc.subscribe(names.HEARTBEATS, cb=on_beat)
    try:
        victim, survivor = spawn_worker(stack.url, concurrency=2), spawn_worker(stack.url, concurrency=2)
        for proc in (victim, survivor):
            await wait_for(lambda p=proc: p.pid in beats or _exited(p), timeout=15, what="worker subprocess")
            assert proc.poll() is None, _log_tail(proc)
        job = await fleet.submit_job("handlers:slow_item", items=range(4), bundle=1, kwargs={"seconds": 2.0})
        await wait_for(
            lambda: len(beats[victim.pid].held) == 2 and len(beats[survivor.pid].held) == 2,
            timeout=10,
            what="each worker holding two tasks",
        )
        victim_id, survivor_id = beats[victim.pid].worker_id, beats[survivor.pid].worker_id
        held = [h.task_id for h in beats[victim.pid].held]

        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        victim.wait()
        record = await fleet.wait_job(job, timeout=15)
        finished_in = time.time() - killed_at
    finally:
        await sub.unsubscribe()

    assert record.counts == {"succeeded": 4} and record.requeues == 2
    # the survivor finishes its own two (<= 2 s) and then the two it took over (2 s)
    assert finished_in < 2.0 + 2.0 + 3.0
    for task in held:
        report = await fleet.report(job, task)
        assert report is not None and report.worker_id == survivor_id != victim_id and report.attempt == 1


async def test_scheduler_restart_mid_job(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    job = await fleet.submit_job("handlers:slow_item", items=range(24), bundle=1, kwargs={"seconds": 0.25})

    async def some_done() -> bool:
        rec = await fleet.job(job)
        return rec is not None and 4 <= rec.done < 20

    await wait_for(some_done, timeout=10, what="a few tasks done")
    await stack.stop_scheduler()
    # the workers keep running and reporting while no scheduler is up
    await asyncio.sleep(0.5)
    await stack.start_scheduler()

    record = await fleet.wait_job(job, timeout=15)
    assert record.total == 24 and record.submitted == 24
    assert record.counts == {"succeeded": 24}
    assert record.retries == 0
    values = sorted([v[0] async for _, v in fleet.results(job)])
    assert values == list(range(24))


async def test_submissions_while_scheduler_is_down_are_admitted_on_start(stack: Stack) -> None:
    await stack.up(workers=2)
    fleet = stack.client
    await stack.stop_scheduler()
    job = await fleet.submit_job("handlers:square", items=range(30), bundle=3)
    await asyncio.sleep(0.2)
    assert await fleet.job(job) is None

    await stack.start_scheduler()
    record = await fleet.wait_job(job, timeout=15)
    assert record.counts == {"succeeded": 10}
    values = [x for _, v in sorted([(r.task_id, v) async for r, v in fleet.results(job)]) for x in v]
    assert values == [i * i for i in range(30)]


async def test_scheduler_restart_with_running_tasks_and_a_lost_worker(stack: Stack) -> None:
    """The scheduler is down while a worker holding tasks stops; the new scheduler still finishes."""
    await stack.start_scheduler()
    fleet = await stack.connect()
    doomed = await stack.start_worker(concurrency=2, grace_s=0.0)
    job = await fleet.submit_job("handlers:slow_item", items=[1, 2], bundle=1, kwargs={"seconds": 2.0})
    await wait_for(lambda: len(doomed.running) == 2, timeout=10, what="worker holding both tasks")

    async def both_running() -> bool:
        rec = await fleet.job(job)
        return rec is not None and rec.counts.get("running", 0) == 2

    await wait_for(both_running, timeout=5, what="job record shows 2 running")
    await stack.stop_scheduler()
    await stack.stop_worker(doomed)  # gone while the scheduler is down
    await stack.start_worker(concurrency=2)
    await stack.start_scheduler()

    record = await fleet.wait_job(job, timeout=15)
    assert record.counts == {"succeeded": 2}
    for task in ("t0000000", "t0000001"):
        report = await fleet.report(job, task)
        assert report is not None and report.worker_id != doomed.worker_id


async def test_killed_worker_does_not_leave_its_command_running(
    stack: Stack, spawn_worker: WorkerProcs, tmp_path: Path
) -> None:
    """Regression: a command dies with its worker (kill -9) instead of running on as an orphan."""
    await stack.start_scheduler()
    fleet = await stack.connect()
    beats: dict[int, Heartbeat] = {}

    async def on_beat(msg: Msg) -> None:
        hb = Heartbeat.from_wire(msg.data)
        beats[hb.pid] = hb

    sub = await fleet.nc.subscribe(names.HEARTBEATS, cb=on_beat)
    pidfile = tmp_path / "command.pid"
    code = f"import os, time, pathlib; pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid())); time.sleep(15)"
    command_pid = None
    try:
        proc = spawn_worker(stack.url, concurrency=1)
        await wait_for(lambda: proc.pid in beats or _exited(proc), timeout=15, what="worker subprocess")
        await fleet.submit(command=["python3", "-c", code], retry=RetryPolicy(max_attempts=1))
        await wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=10, what="command started")
        command_pid = int(pidfile.read_text())

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await wait_for(lambda: not _alive(command_pid), timeout=3, what="the orphaned command to die")
    finally:
        await sub.unsubscribe()
        if command_pid is not None and _alive(command_pid):
            os.kill(command_pid, signal.SIGKILL)


# -- helpers ---------------------------------------------------------------------------------------
async def _states(stack: Stack, job: str, task: str) -> list[TaskRecord]:
    """The task's state history (copied from the state of record into FLEET_EVENTS by the server)."""
    subject = names.event_subject(job, task, names.EVENT_STATE)
    return [
        TaskRecord.from_wire(m.data)
        async for m in reader.replay(stack.client.js, names.EVENTS_STREAM, subject)
    ]


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def _log_tail(proc: subprocess.Popen[bytes]) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace")[-3000:] if path else "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
