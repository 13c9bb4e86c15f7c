"""Rendering for the CLI: tables, JSON, progress bars, JSONL results."""

from __future__ import annotations

import json
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.sdk.client import FleetClient
from fleet.core.records import DeadLetter, JobRecord, TaskEvent, TaskRecord
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
        "failures": dict(r.failures),
        "retries": r.retries,
        "requeues": r.requeues,
        "stale_reports": r.stale_reports,
        "created_at": r.created_at,
        "finished_at": r.finished_at,
        "waiting": r.waiting,
        "priority": r.priority,
        "qos": r.qos,
        "project": r.project,
    }


def jobs_table(records: list[JobRecord]) -> Table:
    table = Table("job", "name", "done/total", "states", "failures", "retries", "requeues", "status")
    for r in records:
        status = "cancelled" if r.cancelled else "finished" if r.finished else "active"
        if r.waiting and not r.finished:
            status = f"queued: {r.waiting}"
        states = " ".join(f"{s}={r.counts[s]}" for s in STATE_ORDER if r.counts.get(s))
        fails = " ".join(f"{k}={n}" for k, n in sorted(r.failures.items()) if n)
        total = str(r.total) if r.total is not None else "?"
        table.add_row(
            r.job_id, r.name, f"{r.done}/{total}", states, fails, str(r.retries), str(r.requeues), status
        )
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


def _task_bar(bar: Progress, running: dict[str, tuple[TaskID, float]], ev: TaskEvent | TaskRecord) -> None:
    key = ev.task_id
    if isinstance(ev, TaskEvent):
        if ev.kind == "progress" and ev.progress is not None:
            if key not in running and len(running) < 8:
                running[key] = (bar.add_task(f"  {key}", total=1.0, extra=""), time.monotonic())
            if key in running:
                bar.update(running[key][0], completed=ev.progress, extra=ev.message or "")
    elif ev.state != TaskState.RUNNING and key in running:
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
            base["failure"] = str(report.error.failure)
        rows = value if report.items is not None and isinstance(value, list) else [value]
        for i, v in enumerate(rows):
            out.write(json.dumps({**base, "index": i, "result": v}, default=repr) + "\n")
            n += 1
    return n


def letter_json(d: DeadLetter, raw: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "origin": d.origin,
        "job_id": d.job_id,
        "task_id": d.task_id,
        "failure": str(d.failure) if d.failure else None,
        "attempt": d.attempt,
        "reason": d.reason,
        "subject": d.subject,
        "at": d.at,
    }
    if raw:
        out["raw"] = d.raw.decode(errors="replace") if d.raw else None
    return out


def letters_table(letters: list[DeadLetter]) -> Table:
    table = Table("when", "job", "task", "class", "reason")
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.at))
        table.add_row(when, d.job_id or "-", d.task_id or "-", str(d.failure or d.origin), d.reason[:120])
    return table
