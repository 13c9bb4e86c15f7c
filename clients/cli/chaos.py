"""``fleet chaos``: fault rounds against a real fleet, and a table of what they found.

One function per fault (:data:`FAULTS`). Each round starts a fresh :class:`ChaosFleet` (nats-server
on its own store, a scheduler, workers; every process logs under the round's work dir), submits a
job of ``fleet.examples.chaos:fenced_commit`` tasks, injects its fault at a moment chosen by
waiting on events (a worker holds tasks in FLEET_STATE, a share of the job is done), then
:func:`~clients.cli.chaos_harness.verify` checks that every task ended as expected, the job's
counts match its task records, each accepted outcome is the recorded one, and each side effect was
committed exactly once. Kill and stop rounds also measure the requeue latency: from the fault to
the task's ``running`` state on another worker (FLEET_EVENTS history).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from clients.cli.chaos_harness import (
    ChaosFleet,
    Check,
    Job,
    Proc,
    held_by,
    retrying,
    task_records,
    verify,
    wait_for,
)
from clients.sdk.client import task_id_for
from fleet.core.records import RetryPolicy
from fleet.core.states import TERMINAL, TaskState
from fleet.examples import chaos as effects

WORKER_FAULTS = ("kill-worker", "stop-worker", "drain-worker")
FAULTS = (*WORKER_FAULTS, "kill-nats", "kill-scheduler", "publish-faults", "poison", "block")
PUBLISH_FAULTS = "dispatch=0.2,state=0.2,result=0.2,job=0.2,purge=0.2,delete=0.2"
RESUME_LIMIT_S = 10.0
COMMIT = "fleet.examples.chaos:fenced_commit"
Special = tuple[str, dict[str, Any], RetryPolicy | None, TaskState]
"""A task other than fenced_commit: handler, kwargs, retry policy, the state it must end in."""


@dataclasses.dataclass(frozen=True)
class Options:
    tasks: int = 60
    """fenced_commit tasks per job."""
    workers: int = 3
    concurrency: int = 3
    seconds: float = 0.3
    """How long each fenced_commit task works."""
    timeout: float = 60.0
    """How long a job may take to end after its fault."""
    downtime: float = 1.0
    """How long nats-server or the scheduler stays dead before its restart."""
    stop_lease: float = 4.0
    block_s: float = 3.5
    publish_faults: str = PUBLISH_FAULTS


@dataclasses.dataclass
class RoundResult(Check):
    fault: str = ""
    workdir: Path = Path()
    latencies: list[float] = dataclasses.field(default_factory=list)
    """Requeue latencies: from the fault to each held task's ``running`` state on another worker."""
    resume_s: float | None = None
    deaths: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double or self.errors or self.deaths)

    def summary(self) -> str:
        lat = ", ".join(f"{x:.2f}" for x in self.latencies)
        resume = "-" if self.resume_s is None else f"{self.resume_s:.2f}"
        lines = [f"{self.fault} ({self.workdir}): lost={self.lost} double={self.double}"]
        lines[0] += f" requeue=[{lat}] resume={resume} tasks={self.tasks} {self.seconds:.1f}s"
        lines += [f"  death: {d}" for d in self.deaths[:5]] + [f"  error: {e}" for e in self.errors[:10]]
        return "\n".join(lines)


async def submit(fleet: ChaosFleet, n: int, seconds: float, specials: Sequence[Special] = ()) -> Job:
    """A job of ``specials``, then ``n`` fenced_commit tasks working ``seconds`` each (one item per task)."""
    job = Job(f"chaos-{uuid.uuid4().hex[:10]}", {}, set())
    commit = (COMMIT, {"store": str(fleet.store), "seconds": seconds}, None, TaskState.SUCCEEDED)
    envs = []
    for i, (handler, kwargs, retry, want) in enumerate([*specials, *[commit] * n]):
        tid = task_id_for(i)
        opts: dict[str, Any] = {"handler": handler, "items": [i], "kwargs": kwargs, "retry": retry}
        envs.append(await fleet.client.envelope(job_id=job.job, task_id=tid, queue=fleet.queue, **opts))
        job.expect[tid] = want
        if handler == COMMIT:
            job.committing.add(tid)
    await fleet.client.declare_job(job.job, name="chaos", total=len(envs), queue=fleet.queue)
    await fleet.client.submit_many(envs)
    return job


# -- choosing the moment -------------------------------------------------------------------------------
async def wait_holder(fleet: ChaosFleet, job: Job, min_tasks: int, idle: bool, timeout: float = 30.0) -> Proc:
    """A live worker holding at least ``min_tasks`` running tasks of ``job`` (per FLEET_STATE); if
    ``idle``, only once no task waits in the queue, so that tasks requeued from it find free slots at
    once and their requeue latency measures detection and redispatch, not the backlog."""

    async def holder() -> Proc | None:
        recs = await retrying(lambda: task_records(fleet.client, job.job))
        if idle and (len(recs) < len(job.expect) or any(r.state == TaskState.QUEUED for r in recs.values())):
            return None
        held = held_by(recs)
        live = [(len(held.get(p.worker_id or "", {})), i, p) for i, p in enumerate(fleet.workers)]
        best = max(live, default=None)
        return best[2] if best is not None and best[0] >= min_tasks else None

    proc: Proc = await wait_for(holder, timeout, f"a worker holding {min_tasks} tasks")
    return proc


async def strike_holder(
    fleet: ChaosFleet, job: Job, sig: signal.Signals, *, idle: bool = True, min_tasks: int = 2
) -> tuple[Proc, float, dict[str, int]]:
    """Send ``sig`` to a worker that holds tasks, at a moment when none of its commits is unreported;
    returns the worker, when, and the tasks (with tokens) the scheduler had running on it."""
    while True:
        victim = await wait_holder(fleet, job, min_tasks, idle)
        async with fleet.commits_settled(job.job) as settled:
            records = await retrying(lambda: task_records(fleet.client, job.job))
            if settled and (held := held_by(records).get(victim.worker_id or "", {})):
                return victim, fleet.signal(victim, sig), held


async def wait_done(fleet: ChaosFleet, job: Job, share: float, timeout: float = 30.0) -> None:
    """Until ``share`` of the job's tasks are terminal."""

    async def far_enough() -> bool:
        recs = await retrying(lambda: task_records(fleet.client, job.job))
        return sum(r.state in TERMINAL for r in recs.values()) >= share * len(job.expect)

    await wait_for(far_enough, timeout, f"{share:.0%} of the job done")


def requeued(res: RoundResult, victim: Proc, held: dict[str, int], t0: float) -> None:
    """Record how long each task ``victim`` held at ``t0`` took to run on another worker."""
    for t, token in sorted(held.items()):
        moved = [
            h.at - t0
            for h in res.history.get(t, [])
            if h.at >= t0 and h.worker_id not in (None, victim.worker_id)
        ]
        got = res.results.get(t)
        if moved:
            res.latencies.append(moved[0])
        elif got is None or got[0].worker_id != victim.worker_id:
            res.errors.append(
                f"{t}: held by {victim.name} (token {token}) at the fault, never ran elsewhere: {res.path(t)}"
            )


# -- the rounds ----------------------------------------------------------------------------------------
def full_waves(fleet: ChaosFleet, opt: Options) -> tuple[int, float]:
    """Tasks and seconds for a kill or stop round: whole waves of at least 0.5 s (the last wave keeps
    every slot busy, so a worker holds several tasks once the queue is empty)."""
    slots = len(fleet.workers) * fleet.concurrency
    return math.ceil(opt.tasks / slots) * slots, max(opt.seconds, 0.5)


async def kill_worker(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    job = await submit(fleet, *full_waves(fleet, opt))
    victim, t0, held = await strike_holder(fleet, job, signal.SIGKILL)
    await verify(fleet, job, res, opt.timeout)
    requeued(res, victim, held, t0)


async def stop_worker(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """SIGSTOP past the lease; SIGCONT once the requeued tasks began elsewhere: the zombie is fenced."""
    job = await submit(fleet, *full_waves(fleet, opt))
    victim, t0, held = await strike_holder(fleet, job, signal.SIGSTOP)
    try:
        begun = lambda: all(effects.highest_begun(fleet.store, job.job, t) > k for t, k in held.items())  # noqa: E731
        await wait_for(begun, opt.timeout, "the stopped worker's tasks to begin elsewhere")
        await wait_for(lambda: time.time() > t0 + opt.stop_lease + 0.5, opt.stop_lease + 1, "the lease")
    finally:
        fleet.signal(victim, signal.SIGCONT)
    await verify(fleet, job, res, opt.timeout)
    requeued(res, victim, held, t0)
    for t in held:
        if (got := res.results.get(t)) is not None and got[0].worker_id == victim.worker_id:
            res.errors.append(
                f"{t}: the stopped (zombie) worker's outcome was accepted: token {got[0].token}"
            )


async def drain_worker(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """SIGTERM with ``--grace 2``: the worker finishes the tasks it runs and exits 0."""
    job = await submit(fleet, opt.tasks, opt.seconds)
    victim, t0, held = await strike_holder(fleet, job, signal.SIGTERM, idle=False)
    try:
        await wait_for(lambda: not victim.alive, fleet.grace_s + 5.0, "the drained worker to exit")
        if victim.popen.returncode != 0:
            res.errors.append(f"{victim.name} exited with {victim.popen.returncode}: {victim.tail()}")
    except TimeoutError:
        res.errors.append(f"{victim.name} still running {time.time() - t0:.1f}s after SIGTERM")
    await verify(fleet, job, res, opt.timeout)
    for t in held:
        if (got := res.results.get(t)) is None or got[0].worker_id != victim.worker_id:
            res.errors.append(f"{t}: running on the draining worker, finished by another: {res.path(t)}")


async def kill_nats(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """kill -9 of nats-server under load, restarted on the same port and store: work resumes."""
    job = await submit(fleet, opt.tasks, opt.seconds)
    await wait_done(fleet, job, 0.2, opt.timeout)
    fleet.kill_server()
    await asyncio.sleep(opt.downtime)
    t_up = fleet.start_server()

    async def resumed() -> float | None:
        recs = await retrying(lambda: task_records(fleet.client, job.job))
        ats = [r.at for r in recs.values() if r.at >= t_up and r.state == TaskState.SUCCEEDED]
        return min(ats) - t_up if ats else None

    try:
        res.resume_s = await wait_for(resumed, 3 * RESUME_LIMIT_S, "work to resume")
        if res.resume_s > RESUME_LIMIT_S:
            res.errors.append(f"work resumed {res.resume_s:.1f}s after the restart (limit {RESUME_LIMIT_S}s)")
    except TimeoutError:
        res.errors.append(f"no task succeeded within {3 * RESUME_LIMIT_S:.0f}s of the restart")
    await verify(fleet, job, res, opt.timeout)


async def kill_scheduler(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    job = await submit(fleet, opt.tasks, opt.seconds)
    await wait_done(fleet, job, 0.2, opt.timeout)
    assert fleet.scheduler is not None
    fleet.signal(fleet.scheduler, signal.SIGKILL)
    await asyncio.sleep(opt.downtime)
    await fleet.start_scheduler()
    await verify(fleet, job, res, opt.timeout)


async def publish_faults(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """The scheduler runs with ``FLEET_FAULTS`` (see :func:`plan`): it must retry and finish."""
    job = await submit(fleet, opt.tasks, opt.seconds / 3)
    await verify(fleet, job, res, opt.timeout)
    assert fleet.scheduler is not None
    if "injected" not in fleet.scheduler.log.read_text(errors="replace"):
        res.errors.append("the scheduler's log mentions no injected fault: was FLEET_FAULTS applied?")


async def poison(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """A task that kills its worker every time ends dead (after max_lost_leases) with a dead letter,
    and the job's other tasks succeed. Workers have one slot: the poison takes no other task down."""
    budget = RetryPolicy(max_lost_leases=2)
    special: Special = ("fleet.examples.chaos:poison", {}, budget, TaskState.DEAD)
    job = await submit(fleet, max(1, opt.tasks // 2), opt.seconds, [special])
    poisoned: list[Proc] = []
    fleet.expected_exit = lambda p: p.worker_id is not None and p.popen.returncode == -signal.SIGKILL

    async def replace_dead() -> None:
        while True:
            for p in fleet.procs:
                if p.worker_id and not p.alive and p not in poisoned:
                    poisoned.append(p)
                    fleet.spawn_worker(concurrency=1)
            await asyncio.sleep(0.1)

    keeper = asyncio.create_task(replace_dead())
    try:
        await verify(fleet, job, res, opt.timeout)
    finally:
        keeper.cancel()
    tid = task_id_for(0)
    if await retrying(lambda: fleet.client.dead_letter(job.job, tid)) is None:
        res.errors.append(f"{tid}: no dead letter on fleet.dlq.task.{job.job}.{tid}: {res.path(tid)}")
    if not 1 <= len(poisoned) <= budget.max_lost_leases:
        res.errors.append(f"the poison task killed {len(poisoned)} workers (budget {budget.max_lost_leases})")


async def block(fleet: ChaosFleet, opt: Options, res: RoundResult) -> None:
    """Handlers that hold the CPU or the event loop for ``block_s`` (longer than the heartbeat interval
    and the scheduler's loss threshold) are not declared lost: no requeue, one token per task."""
    kw = {"seconds": opt.block_s}
    cpu: Special = ("fleet.examples.chaos:cpu_block", kw, None, TaskState.SUCCEEDED)
    loop: Special = ("fleet.examples.chaos:loop_block", kw, None, TaskState.SUCCEEDED)
    job = await submit(fleet, max(1, opt.tasks // 3), opt.seconds, [cpu, loop, cpu, loop])
    await verify(fleet, job, res, opt.timeout)
    for t, hist in sorted(res.history.items()):
        tokens = sorted({h.token for h in hist if h.state == TaskState.RUNNING and h.token is not None})
        if len(tokens) > 1 or (t in res.records and res.records[t].lost):
            res.errors.append(f"{t}: declared lost while blocking: {res.path(t)}")
    if res.job is not None and res.job.requeues:
        res.errors.append(f"job requeued {res.job.requeues} tasks; no worker was lost")


# -- running and reporting -------------------------------------------------------------------------------
Body = Callable[[ChaosFleet, Options, RoundResult], Awaitable[None]]


def plan(fault: str, opt: Options) -> tuple[Body, dict[str, Any], int]:
    """A round's body, its fleet's settings and how many workers it starts."""
    base: dict[str, Any] = {"concurrency": opt.concurrency}
    faulty = {**base, "scheduler_env": {"FLEET_FAULTS": opt.publish_faults}}
    plans: dict[str, tuple[Body, dict[str, Any], int]] = {
        "kill-worker": (kill_worker, base, opt.workers),
        "stop-worker": (stop_worker, {**base, "lease_s": opt.stop_lease}, opt.workers),
        "drain-worker": (drain_worker, {**base, "grace_s": 2.0}, opt.workers),
        "kill-nats": (kill_nats, base, opt.workers),
        "kill-scheduler": (kill_scheduler, base, opt.workers),
        "publish-faults": (publish_faults, faulty, opt.workers),
        "poison": (poison, {"concurrency": 1}, opt.workers),
        "block": (block, {"concurrency": 2}, 2),
    }
    if fault not in plans:
        raise ValueError(f"unknown fault {fault!r}; use one of: {', '.join(FAULTS)}")
    return plans[fault]


async def run_round(fault: str, workdir: Path, opt: Options = Options()) -> RoundResult:
    """One round of ``fault`` on a fresh fleet under ``workdir`` (its process logs stay there)."""
    body, settings, workers = plan(fault, opt)
    res = RoundResult(fault=fault, workdir=workdir)
    started = time.monotonic()
    fleet = ChaosFleet(workdir, **settings)
    try:
        await fleet.start(workers)
        await body(fleet, opt, res)
    except Exception as exc:
        res.errors.append(f"round aborted: {type(exc).__name__}: {exc}")
        (workdir / "round-error.txt").write_text(traceback.format_exc())
    finally:
        fleet.reap()
        res.deaths = list(fleet.deaths)
        await fleet.stop()
        res.seconds = time.monotonic() - started
        (workdir / "result.txt").write_text(res.summary() + "\n" + "\n".join(res.errors[10:]))
    return res


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None if there are no values."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] if ordered else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(results: Sequence[RoundResult]) -> Table:
    """One row per fault: rounds, tasks, lost, double-committed, requeue p50/p99, resume, deaths."""
    t = Table(title="fleet chaos", box=box.SIMPLE_HEAD)
    t.add_column("fault", no_wrap=True)
    for col in ("rounds", "tasks", "lost", "double-\ncommitted", "requeue\np50/p99 (s)", "resume\nmax (s)"):
        t.add_column(col, justify="right", no_wrap=True)
    for col in ("process\ndeaths", "failed\nrounds", "s/round"):
        t.add_column(col, justify="right", no_wrap=True)
    for fault in dict.fromkeys(r.fault for r in results):
        rs = [r for r in results if r.fault == fault]
        lat = [x for r in rs for x in r.latencies]
        bad = sum(not r.ok for r in rs)
        t.add_row(
            fault,
            str(len(rs)),
            str(sum(r.tasks for r in rs)),
            str(sum(r.lost for r in rs)),
            str(sum(r.double for r in rs)),
            f"{_fmt(percentile(lat, 50))}/{_fmt(percentile(lat, 99))}",
            _fmt(max((r.resume_s for r in rs if r.resume_s is not None), default=None)),
            str(sum(len(r.deaths) for r in rs)),
            f"[red]{bad}[/red]" if bad else "0",
            f"{sum(r.seconds for r in rs) / len(rs):.1f}",
        )
    return t


def run_chaos(
    rounds: int,
    faults: list[str] | None,
    workdir: str | Path,
    *,
    options: Options | None = None,
    console: Console | None = None,
) -> int:
    """Run ``rounds`` rounds of each fault (every process logs under ``workdir``) and print the table.
    Returns 1 if a task was lost or committed twice, a check failed, or a process died unexpectedly."""
    out, opt, chosen = (
        console or Console(width=max(Console().width, 110)),
        options or Options(),
        list(faults or FAULTS),
    )
    for f in chosen:
        plan(f, opt)  # an unknown name fails before anything starts
    root, results = Path(workdir), []

    async def go() -> None:
        for fault in chosen:
            for i in range(rounds):
                results.append(r := await run_round(fault, root / f"{fault}-{i:03d}", opt))
                mark = "ok" if r.ok else "[red]FAILED[/red]"
                out.print(f"{fault} round {i + 1}/{rounds}: {mark} ({r.seconds:.1f}s)", highlight=False)

    asyncio.run(go())
    out.print(table(results))
    failed = [r for r in results if not r.ok]
    for r in failed[:10]:
        out.print(r.summary(), highlight=False, markup=False)
    out.print(f"process logs under {root}", highlight=False)
    return 1 if failed else 0
