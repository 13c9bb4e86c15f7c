"""Benchmark of the scheduler's waiting room, with no server: indexing rate, memory per waiting
task, and the cost of a dispatch decision at a small and a large backlog.

    python -m clients.cli.bench_room --tasks 1000000 --jobs 1
    python -m clients.cli.bench_room --tasks 1000000 --jobs 1000

It drives the pure ledger the way the scheduler does (admit in batches of 512, release after each
batch) with envelopes built like the SDK's, and reports JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from typing import Any

from fleet.core.effects import Dispatch
from fleet.core.ledger import Ledger
from fleet.core.records import Payload, TaskEnvelope

BATCH = 512


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _envelope(job: str, task: str, tenant: str) -> TaskEnvelope:
    return TaskEnvelope(
        job_id=job,
        task_id=task,
        handler="fleet.examples.montecarlo:simulate",
        payload=Payload(size=9, data=b"\x92\x01\xcb?\xe0\x00\x00\x00\x00\x00\x00"),
        tenant=tenant,
        created_at=1_800_000_000.0,
    )


def index(ledger: Ledger, tasks: int, jobs: int, tenants: int) -> dict[str, float]:
    per_job = tasks // jobs
    seq = 0
    now = 1_800_000_000.0
    gc.collect()
    before = _rss_mb()
    spent = 0.0
    batch: list[TaskEnvelope] = []
    for j in range(jobs):
        job = f"job{j:05d}"
        tenant = f"tenant{j % tenants}"
        for i in range(per_job):
            batch.append(_envelope(job, f"t{i:07d}", tenant))  # decoding is the shell's cost
            if len(batch) == BATCH:
                spent += _admit(ledger, batch, seq, now)
                seq += len(batch)
                batch = []
    if batch:
        spent += _admit(ledger, batch, seq, now)
    gc.collect()
    return {
        "indexed": tasks,
        "index_rate_per_s": round(tasks / spent),
        "rss_mb": round(_rss_mb(), 1),
        "rss_growth_mb": round(_rss_mb() - before, 1),
        "bytes_per_waiting_task": round((_rss_mb() - before) * 2**20 / tasks, 1),
    }


def _admit(ledger: Ledger, batch: list[TaskEnvelope], seq: int, now: float) -> float:
    t = time.perf_counter()
    for k, env in enumerate(batch):
        ledger.admit(env, now, intake_seq=seq + k + 1)
    ledger.release(now, {})  # no workers: nothing leaves, as in the scheduler after each batch
    return time.perf_counter() - t


def decisions(ledger: Ledger, picks: int) -> dict[str, float]:
    """Time ``picks`` dispatch decisions (release into free slots), then hand the tasks back."""
    now = 1_800_000_001.0
    t = time.perf_counter()
    effects = ledger.release(now, {"default": picks})
    spent = time.perf_counter() - t
    n = sum(1 for e in effects if isinstance(e, Dispatch))
    return {"decisions": n, "decisions_per_s": round(n / spent) if spent else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--picks", type=int, default=10_000)
    args = ap.parse_args(argv)
    small = Ledger()
    index(small, 2 * args.picks, 1, args.tenants)
    small_dec = decisions(small, args.picks)
    ledger = Ledger()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "tasks": args.tasks,
        "jobs": args.jobs,
        "tenants": args.tenants,
    }
    out |= index(ledger, args.tasks, args.jobs, args.tenants)
    out[f"decisions_at_{2 * args.picks}_backlog"] = small_dec
    out["decisions_at_full_backlog"] = decisions(ledger, args.picks)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
