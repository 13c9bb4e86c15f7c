"""Benchmark of the scheduler's waiting room, with no server: indexing rate, memory per waiting
task, and the cost of a dispatch decision at a small and a large backlog.

    python -m clients.cli.bench_room --tasks 1000000 --jobs 1
    python -m clients.cli.bench_room --tasks 1000000 --jobs 1000
    python -m clients.cli.bench_room --tasks 200000 --jobs 1 --server

It drives the pure ledger the way the scheduler does (admit in batches of 512, release after each
batch) with envelopes built like the SDK's, and reports JSON. With ``--server`` it measures the
whole intake path instead: the envelopes are stored in FLEET_INTAKE of an embedded nats-server
first, then a ``fleet scheduler`` process (no workers) indexes them; it reports the rate and the
scheduler's resident memory.
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


def _vm(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def server_index(tasks: int, jobs: int) -> dict[str, Any]:
    """Store ``tasks`` envelopes in FLEET_INTAKE, then time a scheduler process indexing them."""
    import asyncio
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from broker import names
    from broker.connection import connect, shutdown
    from broker.provision import ensure_bus
    from broker.publisher import Publisher
    from broker.server import EmbeddedServer

    store = Path(tempfile.mkdtemp(prefix="fleet-bench-room-"))
    server = EmbeddedServer(store / "nats").start()
    per_job = tasks // jobs

    async def load() -> float:
        nc = await connect(server.url)
        js = nc.jetstream()
        await ensure_bus(js)
        pub = Publisher(nc)
        t = time.perf_counter()
        for j in range(jobs):
            job = f"job{j:05d}"
            base = _envelope(job, "t0000000", f"tenant{j % 4}")
            for start in range(0, per_job, 2000):
                outs = [
                    (names.intake_task(job, tid), base.model_copy(update={"task_id": tid}).to_wire(), None)
                    for tid in (f"t{i:07d}" for i in range(start, min(per_job, start + 2000)))
                ]
                await pub.publish_many(outs)
        await shutdown(nc)
        return time.perf_counter() - t

    async def indexed(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
        nc = await connect(server.url)
        kv = None
        t0 = time.perf_counter()
        peak = 0.0
        try:
            while True:
                peak = max(peak, _vm(proc.pid, "VmRSS"))
                if kv is None:
                    try:
                        kv = await nc.jetstream().key_value(names.JOBS_BUCKET)
                    except Exception:
                        await asyncio.sleep(0.2)
                        continue
                done = 0
                for j in range(jobs):
                    try:
                        from fleet.core.records import JobRecord

                        entry = await kv.get(f"job{j:05d}")
                        done += JobRecord.from_wire(entry.value or b"").submitted
                    except Exception:
                        pass
                if done >= jobs * per_job:
                    return time.perf_counter() - t0, peak
                await asyncio.sleep(0.5)
        finally:
            await shutdown(nc)

    try:
        load_s = asyncio.run(load())
        proc = subprocess.Popen(
            [sys.executable, "-m", "clients.cli.main", "scheduler", "--nats", server.url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            spent, rss = asyncio.run(indexed(proc))
            hwm = _vm(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        server.stop()
    return {
        "server_tasks": jobs * per_job,
        "server_jobs": jobs,
        "stored_in_s": round(load_s, 1),
        "indexed_in_s_incl_start": round(spent, 1),
        "server_index_rate_per_s": round(jobs * per_job / spent),
        "scheduler_rss_mb": round(rss, 1),
        "scheduler_peak_rss_mb": round(hwm, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--picks", type=int, default=10_000)
    ap.add_argument("--server", action="store_true", help="Measure the intake path of a real scheduler.")
    args = ap.parse_args(argv)
    if args.server:
        measured = server_index(args.tasks, args.jobs)
        print(json.dumps(measured, indent=2))
        return measured
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
