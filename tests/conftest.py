"""Shared fixtures: a real nats-server per test, in-process fleets, worker subprocesses.

* ``nats_server``: an :class:`broker.server.EmbeddedServer` (the pinned nats-server binary) on
  free ports with its JetStream store in ``tmp_path``; stopped after the test.
* ``stack``: a :class:`Stack` bound to that server. ``await stack.up(workers=2)`` starts a
  scheduler and in-process workers as tasks of the test's event loop (short intervals: heartbeat
  0.25 s, lease 1 s, flush 0.05 s, a worker lost after 4 missed heartbeats) and connects ``stack.client``; everything is stopped at teardown.
* ``spawn_worker``: starts ``python -m clients.cli.main worker ...`` subprocesses (for kill -9
  tests); every one still alive is killed at teardown.

Test handlers live in ``tests/handlers.py`` and are named ``handlers:<function>``: ``tests/`` is put
on ``sys.path`` here and on ``PYTHONPATH`` of every subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from broker import reader  # noqa: E402
from broker.server import EmbeddedServer  # noqa: E402
from clients.sdk.client import FleetClient  # noqa: E402
from fleet.scheduler.service import Scheduler, SchedulerSettings  # noqa: E402
from fleet.worker.runtime import Worker, WorkerSettings  # noqa: E402

HEARTBEAT_S = 0.25
LEASE_S = 1.0
MISSED = 4.0
"""The scheduler's liveness deadline in tests: 4 heartbeats (1 s), looser than production's 2.5,
so a loaded CI machine does not declare a busy in-process worker lost."""
FLUSH_S = 0.05
POLL_S = 0.05


# -- helpers ---------------------------------------------------------------------------------------
async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = POLL_S,
    what: str = "",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


count = reader.count
"""Messages stored in a stream on subjects matching a filter."""


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for fleet subprocesses: repo root and tests/ importable, no inherited fleet URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    path = [str(REPO), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def _start(
    run: Awaitable[None], ready: asyncio.Event, what: str, timeout: float = 15.0
) -> asyncio.Task[None]:
    """Run a service's ``run()`` as a task; return once ``ready`` is set (or fail if it died)."""
    task = asyncio.ensure_future(run)
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task in done:
            task.result()  # raises what run() raised
            raise AssertionError(f"{what} returned before it was ready")
        task.cancel()
        raise AssertionError(f"{what} not ready within {timeout}s")
    return task


async def _finish(task: asyncio.Task[None], stop: Callable[[], None], timeout: float = 10.0) -> None:
    stop()
    if task.done():
        if not task.cancelled():
            task.result()
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"service did not stop within {timeout}s") from None


class Stack:
    """A scheduler and in-process workers on one server, all in the test's event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scheduler: Scheduler | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self.workers: list[Worker] = []
        self._worker_tasks: dict[str, asyncio.Task[None]] = {}
        self._client: FleetClient | None = None

    @property
    def client(self) -> FleetClient:
        assert self._client is not None, "call await stack.up() or stack.connect() first"
        return self._client

    async def connect(self) -> FleetClient:
        if self._client is None:
            self._client = await FleetClient.connect(self.url)
        return self._client

    async def up(self, workers: int = 2, **worker_settings: Any) -> Stack:
        await self.start_scheduler()
        for _ in range(workers):
            await self.start_worker(**worker_settings)
        await self.connect()
        return self

    async def start_scheduler(self, **settings: Any) -> Scheduler:
        assert self.scheduler is None, "a scheduler is already running"
        sched = Scheduler(
            self.url, SchedulerSettings(**{"flush_s": FLUSH_S, "missed_heartbeats": MISSED, **settings})
        )
        self._scheduler_task = await _start(sched.run(), sched.ready, "scheduler")
        self.scheduler = sched
        return sched

    def scheduler_task_done(self) -> bool:
        """True if the running scheduler's ``run()`` has returned or raised."""
        return self._scheduler_task is not None and self._scheduler_task.done()

    def forget_crashed_scheduler(self) -> BaseException | None:
        """If the scheduler's ``run()`` raised, detach it (so teardown does not re-raise) and return
        the exception; used by tests that document a crash."""
        task = self._scheduler_task
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return None
        self.scheduler, self._scheduler_task = None, None
        return task.exception()

    def worker_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._worker_tasks.values())

    async def stop_scheduler(self) -> None:
        sched, task = self.scheduler, self._scheduler_task
        self.scheduler, self._scheduler_task = None, None
        if sched is not None and task is not None:
            await _finish(task, sched.stop)

    async def start_worker(self, **settings: Any) -> Worker:
        defaults: dict[str, Any] = {
            "heartbeat_s": HEARTBEAT_S,
            "lease_s": LEASE_S,
            "concurrency": 2,
            "grace_s": 1.0,
            "fetch_timeout_s": 0.5,
        }
        worker = Worker(self.url, WorkerSettings(**{**defaults, **settings}))
        self._worker_tasks[worker.worker_id] = await _start(worker.run(), worker.ready, "worker")
        self.workers.append(worker)
        return worker

    async def stop_worker(self, worker: Worker) -> None:
        task = self._worker_tasks.pop(worker.worker_id, None)
        if task is not None:
            await _finish(task, worker.stop)
        self.workers = [w for w in self.workers if w is not worker]

    async def close(self) -> None:
        errors: list[BaseException] = []
        if self._client is not None:
            await self._client.close()
            self._client = None
        for worker in list(self.workers):
            try:
                await self.stop_worker(worker)
            except Exception as exc:
                errors.append(exc)
        try:
            await self.stop_scheduler()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stack(nats_server: EmbeddedServer) -> AsyncIterator[Stack]:
    st = Stack(nats_server.url)
    try:
        yield st
    finally:
        await st.close()


class WorkerProcs:
    """Worker subprocesses (``fleet worker``), each logging to a file under ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, url: str, *extra: str, concurrency: int = 2) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "clients.cli.main", "worker", "--nats", url]
        cmd += ["--heartbeat", str(HEARTBEAT_S), "--lease", str(LEASE_S), "--concurrency", str(concurrency)]
        cmd += list(extra)
        log = self.tmp_path / f"worker-{len(self.procs)}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=subprocess_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        """SIGKILL each worker's whole process group (it leads its own session), so children such as
        process-pool workers or commands go too, even when the worker itself was killed earlier."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[WorkerProcs]:
    procs = WorkerProcs(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()
