"""The worker's side of issue 5 against a real nats-server, with a fake scheduler written here.

The fake scheduler answers heartbeat requests (fencing the tokens a test chooses, or not answering
at all) and records every start and done report from the core-NATS copies of the publishes; no
scheduler consumer runs, so the task messages are published by the tests themselves.
Subprocess workers (``fleet worker``) are used where a real process matters: SIGSTOP/SIGCONT,
SIGTERM with a thread that cannot be stopped, a process-pool child that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerProcs, count, wait_for
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import blobs, codec, names
from broker.connection import connect
from broker.provision import ensure_bus, ensure_queue
from broker.server import EmbeddedServer
from fleet.core import fencing
from fleet.core.failures import FailureClass
from fleet.core.records import (
    DoneReport,
    Fence,
    Heartbeat,
    HeartbeatReply,
    Payload,
    StartReport,
    TaskEnvelope,
    TaskEvent,
)
from fleet.worker.errors import Retry
from fleet.worker.runtime import Worker, WorkerSettings

MOD = __name__

# ---- handlers (in-process workers import this module by name) ------------------------------------------
SEEN: dict[str, str] = {}


def until_stopped(key: str, ctx: Any) -> str:
    """Runs until its context is fenced or cancelled; records which."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if ctx.fenced:
            SEEN[key] = "fenced"
            return "fenced"
        if ctx.cancelled:
            SEEN[key] = "cancelled"
            return "cancelled"
        time.sleep(0.01)
    return "timeout"


def report_token(ctx: Any) -> int:
    ctx.progress(0.5, "half")
    time.sleep(0.3)  # past one event flush
    return int(ctx.token)


def spin(seconds: float) -> int:
    """Pure-Python busy loop: holds the GIL as much as a thread can."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


async def block_the_loop(seconds: float) -> float:
    """A badly written async handler: blocks the worker's event loop."""
    time.sleep(seconds)  # noqa: ASYNC251 - the point of this handler
    return seconds


def retry_nan() -> None:
    raise Retry("try later", delay_s=float("nan"))


def retry_inf() -> None:
    raise Retry("try much later", delay_s=float("inf"))


# ---- a fake scheduler and the bus ------------------------------------------------------------------------
class FakeScheduler:
    def __init__(self) -> None:
        self.answer = True
        self.fence: dict[int, bool] = {}
        """Tokens to fence when a heartbeat lists them, with the fence's ``ack``."""
        self.beats: list[Heartbeat] = []
        self.starts: list[tuple[StartReport, str]] = []
        self.dones: dict[int, DoneReport] = {}
        self.events: list[TaskEvent] = []

    async def attach(self, nc: NATS) -> None:
        await nc.subscribe(names.HEARTBEATS, cb=self._on_beat)
        await nc.subscribe(names.REPORTS_SUBJECTS, cb=self._on_report)
        await nc.subscribe(names.EVENTS_SUBJECTS, cb=self._on_event)

    async def _on_beat(self, msg: Msg) -> None:
        hb = Heartbeat.from_wire(msg.data)
        self.beats.append(hb)
        if not self.answer or not msg.reply:
            return
        fences = [
            Fence(
                job_id=t.job_id,
                task_id=t.task_id,
                token=t.token,
                reason="fenced by the test",
                ack=self.fence[t.token],
            )
            for t in hb.held
            if t.token in self.fence
        ]
        await msg.respond(HeartbeatReply(fence=fences).to_wire())

    async def _on_report(self, msg: Msg) -> None:
        if msg.subject.startswith(names.report_start("")):
            self.starts.append((StartReport.from_wire(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")))
        else:
            report = DoneReport.from_wire(msg.data)
            self.dones.setdefault(report.token, report)

    async def _on_event(self, msg: Msg) -> None:
        if msg.subject.endswith((".progress", ".log")):
            self.events.append(TaskEvent.from_wire(msg.data))

    def held(self, pid: int | None = None) -> set[int]:
        """Tokens listed by the latest heartbeat (of the worker with ``pid``)."""
        for hb in reversed(self.beats):
            if pid is None or hb.pid == pid:
                return {t.token for t in hb.held}
        return set()

    def beats_of(self, pid: int) -> int:
        return sum(1 for b in self.beats if b.pid == pid)


@dataclass
class Bus:
    url: str
    nc: NATS
    js: JetStreamContext
    fake: FakeScheduler = field(default_factory=FakeScheduler)

    async def submit(
        self,
        job: str,
        task: str,
        *,
        handler: str | None = None,
        command: list[str] | None = None,
        args: list[Any] | None = None,
        queue: str = "default",
        timeout_s: float | None = None,
    ) -> int:
        """Publish a task message; return the token of its first delivery."""
        payload = Payload.model_validate(await blobs.make_payload(None, {"args": args or []}, job=job))
        env = TaskEnvelope(
            task_id=task,
            job_id=job,
            handler=handler,
            command=command,
            payload=payload,
            queue=queue,
            timeout_s=timeout_s,
            created_at=time.time(),
        )
        ack = await self.js.publish(
            names.task_subject(queue, job, task), env.to_wire(), headers={names.HDR_ATTEMPT: "1"}
        )
        return fencing.make(ack.seq, 1)

    async def left(self, queue: str = "default") -> int:
        """Task messages still in the work queue (an acked one is deleted)."""
        return await count(self.js, names.TASKS_STREAM, names.queue_filter(queue))

    async def done(self, token: int, timeout: float = 10.0) -> DoneReport:
        await wait_for(lambda: token in self.fake.dones, timeout=timeout, what=f"done report of {token}")
        return self.fake.dones[token]


@pytest.fixture
async def bus(nats_server: EmbeddedServer) -> AsyncIterator[Bus]:
    nc = await connect(nats_server.url, name="test")
    js = nc.jetstream()
    await ensure_bus(js)
    b = Bus(nats_server.url, nc, js)
    await b.fake.attach(nc)
    try:
        yield b
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def a_worker(url: str, **settings: Any) -> AsyncIterator[Worker]:
    defaults: dict[str, Any] = {"heartbeat_s": 0.2, "concurrency": 2, "grace_s": 1.0, "fetch_timeout_s": 0.5}
    worker = Worker(url, WorkerSettings(**{**defaults, **settings}))
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready.is_set() or task.done(), timeout=15, what="worker ready")
    if task.done():
        task.result()
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def beats_pass(bus: Bus, n: int = 3, pid: int | None = None) -> None:
    """Let ``n`` more heartbeats go by (a few pulse rounds)."""
    pid = os.getpid() if pid is None else pid
    target = bus.fake.beats_of(pid) + n
    await wait_for(lambda: bus.fake.beats_of(pid) >= target, timeout=10, what=f"{n} more heartbeats")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie no one has reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _log_tail(proc: subprocess.Popen[bytes]) -> str:
    path: Path = proc.log_path  # type: ignore[attr-defined]
    return path.read_text(errors="replace")[-3000:]


# ---- fences ------------------------------------------------------------------------------------------------
async def test_fence_stops_a_thread_handler_and_acks_its_message(bus: Bus) -> None:
    key = f"fence-ack-{time.monotonic_ns()}"
    async with a_worker(bus.url) as worker:
        token = await bus.submit("j1", "t1", handler=f"{MOD}:until_stopped", args=[key])
        await wait_for(lambda: token in bus.fake.held(), what="the delivery listed in a heartbeat")
        (start, msg_id), *_ = bus.fake.starts
        assert [t.token for t in start.tasks] == [token] and start.tasks[0].delivery == 1
        assert msg_id == names.msgid_start(worker.worker_id, token)

        bus.fake.fence[token] = True
        await wait_for(lambda: SEEN.get(key) == "fenced", timeout=5, what="ctx.fenced seen by the handler")
        await wait_for(lambda: not worker.running, timeout=5, what="the worker to drop the delivery")
        await wait_for(lambda: _zero(bus), timeout=5, what="the message acked")
        await beats_pass(bus)
        assert token not in bus.fake.held()
        assert token not in bus.fake.dones, "a fenced delivery must not report"


async def _zero(bus: Bus) -> bool:
    return await bus.left() == 0


async def test_fence_without_ack_leaves_the_message(bus: Bus) -> None:
    key = f"fence-noack-{time.monotonic_ns()}"
    async with a_worker(bus.url) as worker:
        token = await bus.submit("j2", "t1", handler=f"{MOD}:until_stopped", args=[key])
        await wait_for(lambda: token in bus.fake.held(), what="the delivery listed in a heartbeat")
        bus.fake.fence[token] = False
        await wait_for(lambda: SEEN.get(key) == "fenced", timeout=5, what="ctx.fenced seen by the handler")
        await wait_for(lambda: not worker.running and token not in worker.registry, timeout=5)
        await beats_pass(bus)
        assert await bus.left() == 1, "ack=False: the message belongs to a newer delivery"
        info = await bus.js.consumer_info(names.TASKS_STREAM, names.queue_consumer("default"))
        assert info.num_ack_pending == 1
        assert token not in bus.fake.dones


async def test_fence_kills_a_command_and_its_children(bus: Bus, tmp_path: Path) -> None:
    pidfile, tokfile = tmp_path / "child.pid", tmp_path / "token"
    script = f'echo "$FLEET_TOKEN" > {tokfile}; sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait'
    async with a_worker(bus.url) as worker:
        token = await bus.submit("j3", "t1", command=["sh", "-c", script])
        await wait_for(pidfile.exists, what="the command's child")
        child = int(pidfile.read_text())
        assert tokfile.read_text().strip() == str(token)
        bus.fake.fence[token] = True
        await wait_for(lambda: _gone(child), timeout=5, what="the command's process group killed")
        await wait_for(lambda: not worker.running, timeout=5)
        await wait_for(lambda: _zero(bus), timeout=5, what="the message acked")
        assert token not in bus.fake.dones


# ---- leases ------------------------------------------------------------------------------------------------
async def test_wpi_keeps_a_two_second_lease_alive_for_five_seconds(bus: Bus) -> None:
    await ensure_queue(bus.js, "short", lease_s=2.0)
    bus.fake.answer = False  # no scheduler: only the +WPI renewals keep the task
    async with a_worker(bus.url, queue="short") as worker:
        assert worker.lease_s == 2.0 and worker.pulse.renew_s == 0.5
        token = await bus.submit("j4", "t1", handler="handlers:slow", args=[5.0], queue="short")
        report = await bus.done(token, timeout=15)
        assert report.outcome == "succeeded" and report.delivery == 1 and report.token == token
        assert report.finished_at - report.started_at >= 4.9
        await wait_for(lambda: _zero_q(bus, "short"), timeout=5, what="the message acked")
        info = await bus.js.consumer_info(names.TASKS_STREAM, names.queue_consumer("short"))
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
        assert worker.pulse.renewals >= 6
        assert len(bus.fake.dones) == 1


async def _zero_q(bus: Bus, queue: str) -> bool:
    return await bus.left(queue) == 0


@pytest.mark.parametrize(("handler", "n"), [("spin", 4), ("block_the_loop", 1)])
async def test_busy_handlers_do_not_starve_lease_renewals(bus: Bus, handler: str, n: int) -> None:
    await ensure_queue(bus.js, "busy", lease_s=2.0)
    async with a_worker(bus.url, queue="busy", concurrency=4) as worker:
        tokens = [
            await bus.submit("jb", f"t{i}", handler=f"{MOD}:{handler}", args=[3.0], queue="busy")
            for i in range(n)
        ]
        reports = [await bus.done(t, timeout=20) for t in tokens]
        assert [r.outcome for r in reports] == ["succeeded"] * n
        assert all(r.delivery == 1 for r in reports)
        info = await bus.js.consumer_info(names.TASKS_STREAM, names.queue_consumer("busy"))
        assert info.num_redelivered == 0
        assert worker.registry.gaps == 0


async def test_worker_fences_itself_when_its_leases_cannot_be_renewed(bus: Bus) -> None:
    await ensure_queue(bus.js, "doomed", lease_s=2.0)
    key = f"self-fence-{time.monotonic_ns()}"
    async with a_worker(bus.url, queue="doomed") as worker:
        token = await bus.submit("j5", "t1", handler=f"{MOD}:until_stopped", args=[key], queue="doomed")
        await wait_for(lambda: token in worker.running, what="the task running")
        # the consumer disappears: every +WPI now fails (no responders)
        await bus.js.delete_consumer(names.TASKS_STREAM, names.queue_consumer("doomed"))
        started = time.monotonic()
        await wait_for(lambda: SEEN.get(key) == "fenced", timeout=5, what="the worker to fence itself")
        assert time.monotonic() - started < 0.8 * 2.0 + 0.5
        report = await bus.done(token)
        assert report.outcome == "failed" and report.error is not None
        assert report.error.failure == FailureClass.LOST
        await wait_for(lambda: not worker.running, timeout=5)


# ---- reports -------------------------------------------------------------------------------------------
async def test_one_start_report_per_batch_then_done_reports_with_tokens(bus: Bus) -> None:
    tokens = [await bus.submit("j6", f"t{i}", handler=f"{MOD}:report_token") for i in range(2)]
    async with a_worker(bus.url, concurrency=2) as worker:
        reports = [await bus.done(t) for t in tokens]
        values = [
            await blobs.load_payload(None, r.result.model_dump(exclude_none=True), job="j6")
            for r in reports
            if r.result
        ]
        assert values == tokens
        assert all(r.outcome == "succeeded" and r.worker_id == worker.worker_id for r in reports)
        started = sorted(t.token for s, _ in bus.fake.starts for t in s.tasks)
        assert started == sorted(tokens)
        assert len(bus.fake.starts) == 1, "both tasks were fetched in one batch: one start report"
        await wait_for(lambda: _zero(bus), timeout=5, what="both messages acked")
        assert worker.completed == 2
    progress = [e for e in bus.fake.events if e.kind == "progress"]
    assert {e.token for e in progress} == set(tokens)
    stored = await count(bus.js, names.REPORTS_STREAM, names.report_done("j6", "*"))
    assert stored == 2


@pytest.mark.parametrize(
    ("handler", "retry_after"), [(f"{MOD}:retry_nan", 0.0), (f"{MOD}:retry_inf", 7 * 24 * 3600.0)]
)
async def test_retry_delays_out_of_range_still_make_a_valid_report(
    bus: Bus, handler: str, retry_after: float
) -> None:
    async with a_worker(bus.url):
        token = await bus.submit("j7", "t1", handler=handler)
        report = await bus.done(token)
    assert report.error is not None and report.error.failure == FailureClass.ERROR
    assert report.error.retryable and report.error.retry_after_s == retry_after


@pytest.mark.parametrize(
    ("work", "failure"),
    [
        ({"command": ["sh", "-c", "kill -9 $$"]}, FailureClass.KILLED),
        ({"command": ["sh", "-c", "exit 3"]}, FailureClass.ERROR),
        ({"handler": "handlers:slow", "args": [5.0], "timeout_s": 0.3}, FailureClass.TIMEOUT),
        ({"handler": "handlers:permanent", "args": [1]}, FailureClass.ERROR),
        ({"handler": "no_such_module_xyz:f"}, FailureClass.INVALID),
        ({"handler": "os:system", "args": ["true"]}, FailureClass.INVALID),
    ],
)
async def test_failures_are_classified(bus: Bus, work: dict[str, Any], failure: FailureClass) -> None:
    async with a_worker(bus.url):
        token = await bus.submit("j8", "t1", **work)
        report = await bus.done(token)
    assert report.outcome == "failed" and report.error is not None
    assert report.error.failure == failure, report.error
    if failure == FailureClass.INVALID:
        assert not report.error.retryable


async def test_allow_list_refuses_other_modules(bus: Bus, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with a_worker(bus.url, allow=["handlers"]):
        refused = await bus.submit("j9", "t1", handler="os:system", args=[f"touch {marker}"])
        other = await bus.submit("j9", "t2", handler=f"{MOD}:report_token")
        allowed = await bus.submit("j9", "t3", handler="handlers:square", args=[4])
        for token in (refused, other):
            report = await bus.done(token)
            assert report.error is not None and report.error.failure == FailureClass.INVALID
            assert "not allowed" in report.error.message and "'handlers'" in report.error.message
        assert (await bus.done(allowed)).outcome == "succeeded"
    assert not marker.exists()


async def test_undecodable_task_is_reported_invalid_and_acked(bus: Bus) -> None:
    async with a_worker(bus.url):
        ack = await bus.js.publish(names.task_subject("default", "j10", "t1"), b"\xc1 not msgpack")
        token = fencing.make(ack.seq, 1)
        report = await bus.done(token)
        assert (report.job_id, report.task_id, report.outcome) == ("j10", "t1", "failed")
        assert report.error is not None and report.error.failure == FailureClass.INVALID
        await wait_for(lambda: _zero(bus), timeout=5, what="the message acked")


async def test_payload_that_is_not_a_map_is_invalid(bus: Bus) -> None:
    data, enc, size = codec.encode_value([1, 2, 3])
    env = TaskEnvelope(
        task_id="t1",
        job_id="j11",
        handler="handlers:square",
        payload=Payload(enc=enc, size=size, data=data),
        created_at=time.time(),
    )
    async with a_worker(bus.url):
        ack = await bus.js.publish(names.task_subject("default", "j11", "t1"), env.to_wire())
        report = await bus.done(fencing.make(ack.seq, 1))
    assert report.error is not None and report.error.failure == FailureClass.INVALID
    assert "must be a map" in report.error.message


# ---- pauses (SIGSTOP / SIGCONT of a worker process) ------------------------------------------------------
PAUSE_S = 1.5


async def _paused_worker_with_finished_task(
    bus: Bus, spawn_worker: WorkerProcs
) -> tuple[subprocess.Popen[bytes], int]:
    """A worker process whose task finishes while it is stopped; heartbeats go unanswered after."""
    await ensure_queue(bus.js, "default", lease_s=10.0)
    proc = spawn_worker(bus.url, "--grace", "1")
    await wait_for(
        lambda: bus.fake.beats_of(proc.pid) > 0 or proc.poll() is not None, timeout=20, what="worker"
    )
    assert proc.poll() is None, _log_tail(proc)
    token = await bus.submit("jp", "t1", handler="handlers:slow", args=[1.0])
    await wait_for(lambda: token in bus.fake.held(proc.pid), what="the task held")
    bus.fake.answer = False
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_S)  # the pause itself: longer than the task has left
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    await beats_pass(bus, 5, pid=proc.pid)  # heartbeats after the pause, none answered
    assert token in bus.fake.held(proc.pid)
    assert token not in bus.fake.dones, "reported before the scheduler confirmed it after a pause"
    return proc, token


async def test_after_a_pause_a_fenced_task_is_never_reported(bus: Bus, spawn_worker: WorkerProcs) -> None:
    proc, token = await _paused_worker_with_finished_task(bus, spawn_worker)
    bus.fake.fence[token] = True
    bus.fake.answer = True
    await wait_for(lambda: token not in bus.fake.held(proc.pid), timeout=5, what="the fence applied")
    await wait_for(lambda: _zero(bus), timeout=5, what="the message acked by the fence")
    await beats_pass(bus, 3, pid=proc.pid)
    assert token not in bus.fake.dones
    assert proc.poll() is None, _log_tail(proc)


async def test_after_a_pause_a_confirmed_task_is_reported(bus: Bus, spawn_worker: WorkerProcs) -> None:
    _, token = await _paused_worker_with_finished_task(bus, spawn_worker)
    bus.fake.answer = True
    report = await bus.done(token, timeout=5)
    assert report.outcome == "succeeded"
    await wait_for(lambda: _zero(bus), timeout=5, what="the message acked")


# ---- shutdown and crashes of worker processes ------------------------------------------------------------
async def test_sigterm_preempts_after_grace_and_exits_despite_a_stuck_thread(
    bus: Bus, spawn_worker: WorkerProcs
) -> None:
    grace = 0.5
    proc = spawn_worker(
        bus.url, "--grace", str(grace), "--allow", "handlers", "--allow", "time", concurrency=2
    )
    await wait_for(
        lambda: bus.fake.beats_of(proc.pid) > 0 or proc.poll() is not None, timeout=20, what="worker"
    )
    polite = await bus.submit("js", "t1", handler="handlers:slow", args=[30.0])
    stuck = await bus.submit("js", "t2", handler="time:sleep", args=[30.0])  # cannot be stopped
    await wait_for(lambda: {polite, stuck} <= bus.fake.held(proc.pid), what="both tasks held")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: proc.poll() is not None, timeout=10, what="the worker to exit")
    elapsed = time.monotonic() - started
    assert elapsed < grace + 1.5, f"took {elapsed:.1f}s to exit\n{_log_tail(proc)}"
    assert proc.returncode == 0, _log_tail(proc)
    for token in (polite, stuck):
        report = await bus.done(token, timeout=2)
        assert report.outcome == "failed" and report.error is not None
        assert report.error.failure == FailureClass.PREEMPTED
    assert await bus.left() == 0, "preempted tasks are acked once their report is stored"
    assert any(b.stopping for b in bus.fake.beats if b.pid == proc.pid)


async def test_a_dying_pool_child_fails_its_task_as_killed_and_the_worker_serves_on(
    bus: Bus, spawn_worker: WorkerProcs
) -> None:
    proc = spawn_worker(
        bus.url, "--executor", "process", "--allow", "handlers", "--allow", "os", concurrency=2
    )
    await wait_for(
        lambda: bus.fake.beats_of(proc.pid) > 0 or proc.poll() is not None, timeout=20, what="worker"
    )
    crash = await bus.submit("jc", "t1", handler="os:_exit", args=[3])
    report = await bus.done(crash, timeout=20)
    assert report.outcome == "failed" and report.error is not None, _log_tail(proc)
    assert report.error.failure == FailureClass.KILLED
    after = await bus.submit("jc", "t2", handler="handlers:square", args=[6])
    report = await bus.done(after, timeout=20)
    assert report.outcome == "succeeded", report.error
    assert report.result is not None
    assert await blobs.load_payload(None, report.result.model_dump(exclude_none=True), job="jc") == 36
    await beats_pass(bus, 2, pid=proc.pid)
    assert proc.poll() is None, _log_tail(proc)


# ---- shutdown of in-process workers ------------------------------------------------------------------
async def test_stop_interrupts_a_waiting_fetch_and_leaves_new_work_for_others(bus: Bus) -> None:
    worker = Worker(bus.url, WorkerSettings(heartbeat_s=0.2, fetch_timeout_s=5.0, grace_s=0.2))
    task = asyncio.create_task(worker.run())
    await wait_for(worker.ready.is_set, timeout=15, what="worker ready")
    await beats_pass(bus, 2)  # the fetch loop is waiting in a 5 s pull by now
    started = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, 5)
    took = time.monotonic() - started
    assert took < 2.5, f"stop took {took:.2f}s: it must not wait for the 5 s pull to expire"
    await bus.submit("jx", "t1", handler="handlers:square", args=[2])
    info = await bus.js.consumer_info(names.TASKS_STREAM, names.queue_consumer("default"))
    assert (info.num_ack_pending, info.num_pending) == (0, 1), "the stopped worker took a message"
    assert bus.fake.beats[-1].stopping, bus.fake.beats[-3:]


async def test_a_task_that_finishes_within_the_grace_period_is_reported_normally(bus: Bus) -> None:
    async with a_worker(bus.url, grace_s=3.0) as worker:
        token = await bus.submit("jg", "t1", handler="handlers:slow", args=[0.5])
        await wait_for(lambda: token in worker.running, what="the task running")
        worker.stop()
        report = await bus.done(token, timeout=5)
        assert report.outcome == "succeeded"
    assert await bus.left() == 0
