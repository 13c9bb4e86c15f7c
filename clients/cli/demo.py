"""``fleet demo``: a Monte Carlo estimate of pi on an embedded fleet, with failures on purpose.

Starts nats-server (JetStream) under ``.fleet/demo``, the scheduler, and worker processes; submits
a sweep in which some tasks fail once (and are retried) and kills one worker with SIGKILL midway
(the scheduler notices its missed heartbeats within about 2.5 s and requeues its tasks, whatever
the lease). Prints a summary and exits 0
only if every task succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker import names
from broker.server import EmbeddedServer
from clients.cli import stack
from clients.sdk.client import FleetClient
from fleet.core.records import JobRecord, RetryPolicy
from fleet.scheduler.service import Scheduler, SchedulerSettings

HEARTBEAT_S = 1.0
LEASE_S = 60.0
SAMPLES = 10_000


def run_demo(*, workers: int, points: int, bundle: int, kill: bool) -> int:
    console = Console()
    store = stack.STATE_DIR / "demo"
    shutil.rmtree(store, ignore_errors=True)
    console.print(f"[bold]fleet demo[/bold]: {points}-point Monte Carlo estimate of pi, {workers} workers")
    with EmbeddedServer(store) as server:
        console.print(f"  nats-server with JetStream at {server.url} (store {store})")
        procs = [
            stack.spawn(
                stack.worker_cmd(
                    server.url, concurrency=4, heartbeat=HEARTBEAT_S, lease=LEASE_S, worker_id=f"demo-w{i}"
                ),
                log=store / f"worker-{i}.log",
            )
            for i in range(workers)
        ]
        try:
            return asyncio.run(
                _demo(console, server.url, procs, points=points, bundle=bundle, kill=kill, store=store)
            )
        finally:
            stack.stop_all(procs)


async def _demo(
    console: Console,
    url: str,
    procs: list[subprocess.Popen[bytes]],
    *,
    points: int,
    bundle: int,
    kill: bool,
    store: Path,
) -> int:
    sched = Scheduler(url, SchedulerSettings(flush_s=0.1))
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sched.run())
        await sched.ready.wait()
        try:
            return await _sweep(console, url, procs, points=points, bundle=bundle, kill=kill, store=store)
        finally:
            sched.stop()
            await runner


async def _sweep(
    console: Console,
    url: str,
    procs: list[subprocess.Popen[bytes]],
    *,
    points: int,
    bundle: int,
    kill: bool,
    store: Path,
) -> int:
    async with await FleetClient.connect(url) as fleet:
        t0 = time.monotonic()
        job = await fleet.submit_job(
            "fleet.examples.montecarlo:estimate",
            items=range(points),
            bundle=bundle,
            name="monte-carlo-pi",
            kwargs={"samples": SAMPLES},
            retry=RetryPolicy(max_attempts=3, backoff_s=0.2),
            timeout_s=120,
        )
        console.print(f"  submitted job {job}: {math.ceil(points / bundle)} tasks of {bundle} points")
        killed = None
        columns = (
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[extra]}"),
        )
        record: JobRecord | None = None
        with Progress(*columns, console=console) as bar:
            overall = bar.add_task("tasks", total=math.ceil(points / bundle), extra="")
            async for record in fleet.job_updates(job):
                extra = f"running={record.counts.get('running', 0)} retries={record.retries} requeues={record.requeues}"
                bar.update(overall, completed=record.done, extra=extra)
                if kill and killed is None and record.total and record.done >= record.total * 0.3:
                    killed = procs[0]
                    os.kill(killed.pid, signal.SIGKILL)
                    bar.console.print(
                        f"  [yellow]kill -9 worker pid {killed.pid}[/yellow] with tasks running"
                    )
        elapsed = time.monotonic() - t0
        assert record is not None
        out = store / "results.jsonl"
        inside = samples = 0
        with out.open("w") as fh:
            async for report, value in fleet.results(job):
                for row in value if isinstance(value, list) else []:
                    inside += row["inside"]
                    samples += row["samples"]
                    fh.write(json.dumps({"task_id": report.task_id, **row}) + "\n")
    return _summary(console, record, elapsed, points, inside, samples, out, killed is not None)


def _summary(
    console: Console,
    r: JobRecord,
    elapsed: float,
    points: int,
    inside: int,
    samples: int,
    out: Path,
    killed: bool,
) -> int:
    ok = r.counts.get("succeeded", 0)
    pi = 4 * inside / samples if samples else float("nan")
    table = Table(title="fleet demo summary", show_header=False)
    for k, v in [
        ("job", r.job_id),
        (
            "tasks",
            f"{r.total} ({ok} succeeded, {r.counts.get('failed', 0)} failed, {r.counts.get('dead', 0)} dead)",
        ),
        ("points", str(points)),
        ("elapsed", f"{elapsed:.1f} s"),
        ("throughput", f"{(r.total or 0) / elapsed:.1f} tasks/s, {points / elapsed:.0f} points/s"),
        ("retries", f"{r.retries} (tasks that failed once on purpose, then succeeded)"),
        ("requeues", f"{r.requeues} (tasks taken from the killed worker)" if killed else str(r.requeues)),
        ("pi estimate", f"{pi:.5f} (error {abs(pi - math.pi):.5f}, {samples:,} samples)"),
        ("results", f"{out} ; stream {names.RESULTS_STREAM}, subjects {names.job_results_filter(r.job_id)}"),
    ]:
        table.add_row(k, v)
    console.print(table)
    good = ok == r.total and samples == points * SAMPLES
    with contextlib.suppress(Exception):
        console.print(
            "[green]demo passed[/green]" if good else "[red]demo FAILED: not every task succeeded[/red]"
        )
    return 0 if good else 1
