"""Rendering for the CLI: tables, JSON, progress bars, JSONL results."""

from __future__ import annotations

import json
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.sdk.client import FleetClient
from fleet.core.records import JobRecord, TaskEvent
from fleet.core.states import TaskState

STATE_ORDER = [str(s) for s in TaskState]


def job_json(r: JobRecord) -> dict[str, Any]:
    return {
        "job_id": r.job_id,
        "name": r.name,
        "tenant": r.tenant,
        "queue": r.queue,
        "total": r.total,
        "submitted": r.submitted,
        "counts": {s: r.counts.get(s, 0) for s in STATE_ORDER},
        "done": r.done,
        "finished": r.finished,
        "cancelled": r.cancelled,
        "retries": r.retries,
        "requeues": r.requeues,
        "created_at": r.created_at,
        "finished_at": r.finished_at,
    }


def jobs_table(records: list[JobRecord]) -> Table:
    table = Table("job", "name", "done/total", "states", "retries", "requeues", "status")
    for r in records:
        status = "cancelled" if r.cancelled else "finished" if r.finished else "active"
        states = " ".join(f"{s}={r.counts[s]}" for s in STATE_ORDER if r.counts.get(s))
        total = str(r.total) if r.total is not None else "?"
        table.add_row(r.job_id, r.name, f"{r.done}/{total}", states, str(r.retries), str(r.requeues), status)
    return table


async def watch(fleet: FleetClient, job_id: str, console: Console) -> JobRecord | None:
    """Progress bars fed by the job's event stream until the job finishes."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[extra]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        overall = bar.add_task(job_id, total=None, extra="")
        running: dict[str, tuple[TaskID, float]] = {}
        async for ev in fleet.events(job_id):
            if isinstance(ev, JobRecord):
                extra = " ".join(f"{s}={ev.counts[s]}" for s in STATE_ORDER if ev.counts.get(s))
                bar.update(overall, total=ev.total, completed=ev.done, extra=extra)
                if ev.finished:
                    return ev
                continue
            _task_bar(bar, running, ev)
    return None


def _task_bar(bar: Progress, running: dict[str, tuple[TaskID, float]], ev: TaskEvent) -> None:
    key = ev.task_id
    if ev.kind == "progress" and ev.progress is not None:
        if key not in running and len(running) < 8:
            running[key] = (bar.add_task(f"  {key}", total=1.0, extra=""), time.monotonic())
        if key in running:
            bar.update(running[key][0], completed=ev.progress, extra=ev.message or "")
    elif (
        ev.kind == "state"
        and ev.state
        in (
            TaskState.SUCCEEDED,
            TaskState.FAILED,
            TaskState.CANCELLED,
            TaskState.DEAD,
            TaskState.RETRYING,
            TaskState.QUEUED,
        )
        and key in running
    ):
        bar.remove_task(running.pop(key)[0])


async def write_results(fleet: FleetClient, job_id: str, out: IO[str]) -> int:
    """One JSON line per item (per task when a task has no items)."""
    n = 0
    async for report, value in fleet.results(job_id):
        base = {
            "job_id": job_id,
            "task_id": report.task_id,
            "outcome": report.outcome,
            "attempt": report.attempt,
        }
        if report.error is not None:
            base["error"] = f"{report.error.type}: {report.error.message}"
        rows = value if report.items is not None and isinstance(value, list) else [value]
        for i, v in enumerate(rows):
            out.write(json.dumps({**base, "index": i, "result": v}, default=repr) + "\n")
            n += 1
    return n
