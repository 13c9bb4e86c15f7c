"""The chaos harness: a real fleet of processes to break, and the checks that nothing was lost.

:class:`ChaosFleet` runs nats-server (fixed port, store under the work dir, so it can be killed -9
and restarted on the same store), the scheduler and worker processes (``python -m
clients.cli.main ...``), each logging to a file under the work dir. It signals them (kill -9,
SIGSTOP/SIGCONT, SIGTERM) and tells the exits it caused from unexpected ones (process deaths).

:func:`verify` reads what the fleet recorded (FLEET_STATE, FLEET_RESULTS, FLEET_EVENTS, the
``fleet_jobs`` KV bucket, the side-effect store of :mod:`fleet.examples.chaos`) and checks: every
task ends in its expected terminal state, the job's counts equal the task records', each accepted
outcome is the recorded one (same token, same outcome), and each task's side effect is committed
exactly once, by the delivery whose outcome was accepted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.msg import Msg

import fleet as fleet_pkg
from broker import names, reader
from broker.server import EmbeddedServer, die_with_parent, free_port
from clients.sdk.client import FleetClient
from fleet.core.records import DoneReport, Heartbeat, JobRecord, TaskRecord
from fleet.core.states import TERMINAL, TaskState
from fleet.examples import chaos as effects

ROOT = Path(fleet_pkg.__file__).resolve().parent.parent
POLL_S = 0.05
T = TypeVar("T")


@dataclasses.dataclass
class Proc:
    """A child process; ``signalled`` once we killed or terminated it (its exit is then expected)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    worker_id: str | None = None
    signalled: bool = False
    reaped: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        return "(no log)"


class ChaosFleet:
    """nats-server, a scheduler and workers as separate processes under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        heartbeat_s: float = 1.0,
        lease_s: float = 60.0,
        concurrency: int = 2,
        grace_s: float = 5.0,
        queue: str = "default",
        scheduler_env: Mapping[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.store = workdir, workdir / "effects"
        self.server = EmbeddedServer(workdir / "nats", port=free_port(), http_port=free_port())
        self.heartbeat_s, self.lease_s, self.grace_s = heartbeat_s, lease_s, grace_s
        self.concurrency, self.queue = concurrency, queue
        self.scheduler_env = dict(scheduler_env or {})
        self.scheduler: Proc | None = None
        self.procs: list[Proc] = []
        self.deaths: list[str] = []
        self.expected_exit: Callable[[Proc], bool] = lambda p: False
        """Exits a round causes on purpose (a poison task kills its worker): not counted as deaths."""
        self.beats: dict[str, Heartbeat] = {}
        self._server_signalled = self._server_dead = False
        self._client: FleetClient | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def client(self) -> FleetClient:
        assert self._client is not None, "call await fleet.start() first"
        return self._client

    @property
    def workers(self) -> list[Proc]:
        """Worker processes that are alive."""
        return [p for p in self.procs if p.worker_id is not None and p.alive]

    async def start(self, workers: int) -> ChaosFleet:
        self.start_server()
        self._client = await FleetClient.connect(self.url)
        await self.client.nc.subscribe(names.HEARTBEATS, cb=self._on_beat)
        await self.start_scheduler()
        await self.wait_ready([self.spawn_worker() for _ in range(workers)])
        return self

    async def _on_beat(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            hb = Heartbeat.from_wire(msg.data)
            self.beats[hb.worker_id] = hb

    async def stop(self) -> None:
        """SIGTERM every live process (SIGKILL to its group after 5 s), then stop the server."""
        live = [p for p in self.procs if p.alive]
        for p in live:
            p.signalled = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGCONT)
                p.popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: not any(p.alive for p in live), 5.0, "processes to stop")
        for p in self.procs:
            if p.alive:  # not yet reaped, so its id is still its own
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.close(), 5.0)
            self._client = None
        self._server_signalled = True
        self.server.stop(grace=5.0)

    def start_server(self) -> float:
        """Start nats-server (again: same port, same store); returns when JetStream answers."""
        self.server.start()
        self._server_signalled = self._server_dead = False
        return time.time()

    def kill_server(self) -> float:
        self._server_signalled, at = True, time.time()
        self.server.kill()
        return at

    async def start_scheduler(self, timeout: float = 30.0) -> Proc:
        """Start a scheduler process; returns once its log says it is ready."""
        assert self.scheduler is None or not self.scheduler.alive, "a scheduler is running"
        n = sum(p.name.startswith("scheduler") for p in self.procs) + 1
        args = ["scheduler", "--nats", self.url]
        proc = self.scheduler = self._spawn(f"scheduler-{n}", args, self.scheduler_env)
        ready = lambda: not proc.alive or "ready" in proc.log.read_text(errors="replace")  # noqa: E731
        await wait_for(ready, timeout, "scheduler ready")
        if not proc.alive:
            raise RuntimeError(f"scheduler exited with {proc.popen.returncode}: {proc.tail()}")
        return proc

    def spawn_worker(self, concurrency: int | None = None) -> Proc:
        n = sum(p.worker_id is not None for p in self.procs) + 1
        wid = f"w{n}-{os.getpid()}-{time.monotonic_ns() % 100000}"
        cmd = ["worker", "--nats", self.url, "--id", wid, "--queue", self.queue]
        cmd += ["--heartbeat", str(self.heartbeat_s), "--lease", str(self.lease_s)]
        cmd += ["--concurrency", str(concurrency or self.concurrency), "--grace", str(self.grace_s)]
        proc = self._spawn(f"worker-{n}", cmd, {})
        proc.worker_id = wid
        return proc

    async def wait_ready(self, procs: list[Proc], timeout: float = 30.0) -> None:
        """Until every one of ``procs`` has sent a heartbeat (or one of them died)."""

        def ready() -> bool:
            for p in procs:
                if not p.alive:
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}: {p.tail()}")
            return all(p.worker_id in self.beats for p in procs)

        await wait_for(ready, timeout, "workers' first heartbeats")

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Proc:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        full.update(env, PYTHONUNBUFFERED="1")
        log = self.workdir / f"{name}.log"
        with log.open("ab") as fh:
            cmd = [sys.executable, "-m", "clients.cli.main", *args]
            popen = subprocess.Popen(
                cmd, cwd=ROOT, env=full, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        self.procs.append(Proc(name, popen, log))
        return self.procs[-1]

    def signal(self, proc: Proc, sig: signal.Signals) -> float:
        """Send ``sig``, return when; a process we SIGKILL or SIGTERM does not count as a death."""
        proc.signalled = proc.signalled or sig in (signal.SIGKILL, signal.SIGTERM)
        at = time.time()
        os.kill(proc.popen.pid, sig)
        if sig == signal.SIGKILL:
            proc.popen.wait()
        return at

    def reap(self) -> list[str]:
        """Record (once) every process that exited without being told to; returns the new ones."""
        new = []
        for p in self.procs:
            if not p.alive and not p.signalled and not p.reaped:
                p.reaped = True
                if not self.expected_exit(p):
                    new.append(f"{p.name} exited with {p.popen.returncode}: {p.tail()}")
        srv = self.server.proc
        if srv is not None and srv.poll() is not None and not (self._server_signalled or self._server_dead):
            self._server_dead = True
            new.append(f"nats-server exited with {srv.returncode}: see {self.server.log_path}")
        self.deaths += new
        return new

    @contextlib.asynccontextmanager
    async def commits_settled(self, job: str, timeout: float = 5.0) -> AsyncIterator[bool]:
        """Hold the side-effect store's lock (no handler can begin or commit meanwhile) and wait until
        every task of ``job`` with a commit has its outcome recorded. A kill inside this block cannot
        land between a commit and its report: a window no fencing closes for a store that is not
        idempotent (the task runs again, and commits again). Yields False if they did not settle."""

        async def settled() -> bool:
            recs = await retrying(lambda: task_records(self.client, job))
            done = {t for t, r in recs.items() if r.state in TERMINAL}
            return all(t in done for j, t, _, _ in effects.read_commits(self.store) if j == job)

        with effects.locked(self.store):
            ok = False
            with contextlib.suppress(TimeoutError):
                ok = await wait_for(settled, timeout, "committed tasks to be reported")
            yield ok


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def retrying(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run a read, again and again while the server is unreachable (a restart in progress)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(fn(), 10.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# -- reading what the fleet recorded -------------------------------------------------------------------
async def task_records(client: FleetClient, job: str) -> dict[str, TaskRecord]:
    """The state of record of every task of ``job`` (last message per subject of FLEET_STATE)."""
    return {r.task_id: r async for r in client.tasks(job)}


async def history(client: FleetClient, job: str) -> dict[str, list[TaskRecord]]:
    """Every state each task of ``job`` went through, oldest first (FLEET_EVENTS)."""
    out: dict[str, list[TaskRecord]] = collections.defaultdict(list)
    subject = names.event_subject(job, "*", names.EVENT_STATE)
    async for msg in reader.replay(client.js, names.EVENTS_STREAM, subject):
        rec = TaskRecord.from_wire(msg.data)
        out[rec.task_id].append(rec)
    return dict(out)


async def results(client: FleetClient, job: str) -> dict[str, tuple[DoneReport, Any]]:
    return {rep.task_id: (rep, value) async for rep, value in client.results(job)}


def held_by(records: Mapping[str, TaskRecord]) -> dict[str, dict[str, int]]:
    """``worker -> {task: token}`` of the tasks the scheduler has running on each worker."""
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for r in records.values():
        if r.state == TaskState.RUNNING and r.worker_id:
            out[r.worker_id][r.task_id] = r.token or 0
    return dict(out)


# -- a job, and the checks that nothing was lost ---------------------------------------------------------
@dataclasses.dataclass
class Job:
    job: str
    expect: dict[str, TaskState]
    committing: set[str]
    """Tasks that run fenced_commit (their side effects are checked)."""


@dataclasses.dataclass
class Check:
    """What :func:`verify` found, and the records it read."""

    tasks: int = 0
    lost: int = 0
    double: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    records: dict[str, TaskRecord] = dataclasses.field(default_factory=dict)
    history: dict[str, list[TaskRecord]] = dataclasses.field(default_factory=dict)
    results: dict[str, tuple[DoneReport, Any]] = dataclasses.field(default_factory=dict)
    job: JobRecord | None = None

    def path(self, task: str) -> str:
        """A task's history, ``state@worker:token`` per step (evidence for a report)."""
        return " > ".join(f"{h.state}@{h.worker_id or '-'}:{h.token}" for h in self.history.get(task, []))


def _show(r: TaskRecord | None) -> str:
    if r is None:
        return "no record"
    return f"{r.state} rev={r.rev} worker={r.worker_id} token={r.token} lost={r.lost} reason={r.reason!r}"


async def verify(fleet: ChaosFleet, job: Job, c: Check, timeout: float) -> Check:
    """Wait (up to ``timeout``) for every task of ``job`` to end, then check the records against each
    other and the side-effect store; adds what it finds to ``c``."""
    c.tasks += len(job.expect)
    client = fleet.client

    async def all_terminal() -> bool:
        c.records = await retrying(lambda: task_records(client, job.job))
        fleet.reap()
        return all(t in c.records and c.records[t].state in TERMINAL for t in job.expect)

    with contextlib.suppress(TimeoutError):
        await wait_for(all_terminal, timeout, "every task terminal")
    for t, want in job.expect.items():
        if (rec := c.records.get(t)) is None or rec.state != want:
            c.lost += 1
            c.errors.append(f"{t}: expected {want}, have {_show(rec)}")
    await _check_job(c, client, job.job)
    c.results = await retrying(lambda: results(client, job.job))
    _check_results(c)

    async def history_behind() -> list[str]:
        c.history = await retrying(lambda: history(client, job.job))
        return [t for t, r in c.records.items() if all(h.rev != r.rev for h in c.history.get(t, []))]

    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: _empty(history_behind()), 10.0, "the state history")
    if behind := await history_behind():
        c.errors.append(f"state history lacks the final record of {len(behind)} tasks, e.g. {behind[:3]}")
    _check_commits(c, job, effects.read_commits(fleet.store), {p.popen.pid: p.name for p in fleet.procs})
    return c


async def _empty(value: Awaitable[list[str]]) -> bool:
    return not await value


async def _check_job(c: Check, client: FleetClient, job: str) -> None:
    want = dict(collections.Counter(str(r.state) for r in c.records.values()))

    def have() -> dict[str, int]:
        return {k: v for k, v in c.job.counts.items() if v} if c.job is not None else {}

    async def matches() -> bool:
        c.job = await retrying(lambda: client.job(job))
        return c.job is not None and c.job.finished and have() == want

    with contextlib.suppress(TimeoutError):
        await wait_for(matches, 10.0, "the job record")
    if c.job is None:
        c.errors.append("no job record in fleet_jobs")
    elif have() != want or not c.job.finished:
        c.errors.append(f"job record counts {have()} (finished: {c.job.finished}) != task records {want}")


def _check_results(c: Check) -> None:
    """At most one accepted outcome per task (one message per subject), and it is the recorded one."""
    for t, rec in c.records.items():
        got = c.results.get(t)
        if rec.state in (TaskState.SUCCEEDED, TaskState.FAILED) and got is None:
            c.errors.append(f"{t}: {rec.state} but no accepted outcome in FLEET_RESULTS")
        elif rec.state in (TaskState.SUCCEEDED, TaskState.FAILED) and got is not None:
            rep, value = got
            if rep.token != rec.token or rep.outcome != str(rec.state):
                c.errors.append(f"{t}: accepted outcome {rep.outcome} token {rep.token}; record {_show(rec)}")
            first = value[0] if isinstance(value, list) and value else None
            if isinstance(first, dict) and first.get("token", rep.token) != rep.token:
                c.errors.append(f"{t}: value token {first['token']} != report token {rep.token}")
        elif got is not None and rec.state == TaskState.DEAD:
            c.errors.append(f"{t}: dead, yet an outcome was accepted: {got[0].outcome} token {got[0].token}")
    if extra := set(c.results) - set(c.records):
        c.errors.append(f"outcomes for unknown tasks: {sorted(extra)[:3]}")


def _check_commits(
    c: Check, job: Job, commits: list[tuple[str, str, int, int]], who: Mapping[int, str]
) -> None:
    """Each fenced_commit task that succeeded committed exactly once, with the accepted token."""
    by_task: dict[str, list[int]] = collections.defaultdict(list)
    by: dict[str, list[str]] = collections.defaultdict(list)
    for j, t, token, pid in commits:
        if j == job.job:
            by_task[t].append(token)
            by[t].append(f"{token} by {who.get(pid, pid)}")
    for t in sorted(job.committing):
        tokens, rec = by_task.get(t, []), c.records.get(t)
        if len(tokens) > 1:
            c.double += 1
            c.errors.append(f"{t}: side effect committed {len(tokens)} times: {by[t]}; history {c.path(t)}")
        if rec is None or rec.state != TaskState.SUCCEEDED:
            continue
        if not tokens:
            c.lost += 1
            c.errors.append(f"{t}: succeeded but its side effect was never committed; {_show(rec)}")
        elif rec.token not in tokens:
            c.errors.append(f"{t}: accepted token {rec.token} is not a committed one {tokens}")
