"""``fleet bench``: no-op tasks through the whole path, beside bare JetStream as the ceiling.

Both runs use the same server and the same number of worker processes:

* **fleet**: client -> intake -> scheduler (its own process) -> tasks -> workers -> reports ->
  scheduler -> ``succeeded`` state event seen by the client. Latency is submit to that event.
* **bare**: client publishes to a work-queue stream, bare workers (fetch batches, publish a result
  to a second stream, ack) and the client sees the result. No validation, state or accounting.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import FetchTimeoutError
from rich.console import Console
from rich.table import Table

from broker import names
from broker.connection import connect, shutdown
from broker.publisher import Publisher
from broker.server import EmbeddedServer
from clients.cli import stack
from clients.sdk.client import FleetClient, new_job_id, task_id_for

WINDOW = 1000
BARE_STREAM, BARE_RESULTS = "BENCH_TASKS", "BENCH_RESULTS"


def run_bench(*, tasks: int, workers: int, concurrency: int, nats: str | None, as_json: bool) -> int:
    console = Console(stderr=as_json)
    store = stack.STATE_DIR / "bench"
    shutil.rmtree(store, ignore_errors=True)
    server = None if nats else EmbeddedServer(store).start()
    url = nats or (server.url if server else "")
    try:
        fleet = _with_procs(
            url, workers, concurrency, store, lambda: _fleet_run(url, tasks, workers), fleet=True
        )
        bare = _with_procs(
            url, workers, concurrency, store, lambda: _bare_run(url, tasks, workers), fleet=False
        )
    finally:
        if server:
            server.stop()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "tasks": tasks,
        "workers": workers,
        "concurrency": concurrency,
        "fleet": fleet,
        "bare": bare,
        "ratio": round(fleet["tasks_per_s"] / bare["tasks_per_s"], 3),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _table(console, result)
    return 0


def _with_procs(
    url: str, workers: int, concurrency: int, store: Any, body: Any, *, fleet: bool
) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    if fleet:
        procs.append(
            stack.spawn(
                [sys.executable, "-m", "clients.cli.main", "scheduler", "--nats", url],
                log=store / "scheduler.log",
            )
        )
        procs += [
            stack.spawn(
                stack.worker_cmd(url, concurrency=concurrency, heartbeat=1.0, lease=10.0),
                log=store / f"worker-{i}.log",
            )
            for i in range(workers)
        ]
    else:
        procs += [
            stack.spawn(
                [sys.executable, "-m", "clients.cli.main", "bench-bare-worker", url],
                log=store / f"bare-{i}.log",
            )
            for i in range(workers)
        ]
    try:
        out: dict[str, float] = asyncio.run(body())
        return out
    finally:
        stack.stop_all(procs)


def _stats(n: int, t_first: float, t_last: float, lat: list[float]) -> dict[str, float]:
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    return {
        "elapsed_s": round(t_last - t_first, 3),
        "tasks_per_s": round(n / (t_last - t_first), 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


async def _fleet_run(url: str, n: int, workers: int) -> dict[str, float]:
    async with await FleetClient.connect(url) as fleet:
        await _wait_workers(fleet.nc, workers)
        for _ in range(1200):  # up to a minute for the scheduler's first pull request
            if (await fleet.js.consumer_info(names.INTAKE_STREAM, names.INTAKE_CONSUMER)).num_waiting:
                break
            await asyncio.sleep(0.05)
        job = new_job_id()
        envs = [
            await fleet.envelope(
                job_id=job, task_id=task_id_for(i), handler="fleet.examples.montecarlo:async_noop"
            )
            for i in range(n)
        ]
        done: dict[str, float] = {}
        finished = asyncio.Event()

        async def on_state(msg: Msg) -> None:
            if msg.data and b"succeeded" in msg.data:
                done.setdefault(msg.subject.split(".")[3], time.perf_counter())
                if len(done) >= n:
                    finished.set()

        sub = await fleet.nc.subscribe(names.job_state_filter(job), cb=on_state)
        await fleet.declare_job(job, name="bench", total=n)
        sent: dict[str, float] = {}
        for start in range(0, n, WINDOW):
            part = envs[start : start + WINDOW]
            now = time.perf_counter()
            sent.update((e.task_id, now) for e in part)
            await fleet.pub.publish_many(
                (names.intake_task(job, e.task_id), e.to_wire(), names.msgid_submit(job, e.task_id))
                for e in part
            )
        await asyncio.wait_for(finished.wait(), 600)
        await sub.unsubscribe()
    lat = [done[t] - sent[t] for t in done]
    return _stats(n, min(sent.values()), max(done.values()), lat)


async def _wait_workers(nc: Any, workers: int) -> None:
    seen: set[str] = set()
    ready = asyncio.Event()

    async def on_hb(msg: Msg) -> None:
        seen.add(msg.subject)
        if len(seen) >= workers:
            ready.set()

    sub = await nc.subscribe(names.HEARTBEATS, cb=on_hb)
    await asyncio.wait_for(ready.wait(), 60)
    await sub.unsubscribe()


async def _bare_setup(js: Any) -> None:
    for name, subj, ret in (
        (BARE_STREAM, "bench.task.>", api.RetentionPolicy.WORK_QUEUE),
        (BARE_RESULTS, "bench.result.>", api.RetentionPolicy.LIMITS),
    ):
        await js.add_stream(
            api.StreamConfig(name=name, subjects=[subj], retention=ret, storage=api.StorageType.FILE)
        )
    await js.add_consumer(
        BARE_STREAM,
        api.ConsumerConfig(
            durable_name="bare", ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=100_000, max_waiting=4096
        ),
    )


async def _bare_run(url: str, n: int, workers: int) -> dict[str, float]:
    nc = await connect(url, name="bench-bare-client")
    js = nc.jetstream()
    done: dict[str, float] = {}
    finished = asyncio.Event()

    async def on_result(msg: Msg) -> None:
        done.setdefault(msg.subject.rsplit(".", 1)[1], time.perf_counter())
        if len(done) >= n:
            finished.set()

    sub = await nc.subscribe("bench.result.>", cb=on_result)
    await nc.flush()
    ready = asyncio.Event()
    bound: list[Msg] = []

    async def on_ready(msg: Msg) -> None:
        bound.append(msg)
        if len(bound) >= workers:
            ready.set()

    ready_sub = await nc.subscribe("bench.ready", cb=on_ready)
    await _bare_setup(js)  # the bare workers bind once the streams exist, then say so
    await asyncio.wait_for(ready.wait(), 60)
    await ready_sub.unsubscribe()
    pub = Publisher(nc)
    body = b"\x81\xa1x\xc0"  # a tiny msgpack map, like an empty task
    sent: dict[str, float] = {}
    for start in range(0, n, WINDOW):
        ids = [str(i) for i in range(start, min(n, start + WINDOW))]
        now = time.perf_counter()
        sent.update((i, now) for i in ids)
        await pub.publish_many((f"bench.task.{i}", body, None) for i in ids)
    await asyncio.wait_for(finished.wait(), 600)
    await sub.unsubscribe()
    await shutdown(nc)
    lat = [done[t] - sent[t] for t in done]
    return _stats(n, min(sent.values()), max(done.values()), lat)


async def bare_worker(url: str, batch: int) -> None:
    """The ceiling's worker: fetch a batch, publish one result per message, ack."""
    nc = await connect(url, name="bench-bare-worker")
    js = nc.jetstream()
    while True:
        try:
            psub = await js.pull_subscribe_bind("bare", stream=BARE_STREAM)
            break
        except Exception:
            await asyncio.sleep(0.05)
    await nc.publish("bench.ready", b"")
    pub = Publisher(nc)
    while True:
        try:
            msgs = await psub.fetch(batch, timeout=2)
        except (TimeoutError, FetchTimeoutError):
            continue
        await pub.publish_many((f"bench.result.{m.subject.rsplit('.', 1)[1]}", b"\xc0", None) for m in msgs)
        for m in msgs:
            await m.ack()


def _table(console: Console, r: dict[str, Any]) -> None:
    m = r["machine"]
    table = Table(
        title=f"fleet bench: {r['tasks']} no-op tasks, {r['workers']} workers x {r['concurrency']} slots"
    )
    table.add_column("path")
    for col in ("tasks/s", "p50 ms", "p99 ms", "elapsed s"):
        table.add_column(col, justify="right")
    for path in ("fleet", "bare"):
        s = r[path]
        label = "fleet (full path)" if path == "fleet" else "bare JetStream (ceiling)"
        table.add_row(
            label,
            f"{s['tasks_per_s']:.0f}",
            f"{s['p50_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            f"{s['elapsed_s']:.2f}",
        )
    console.print(table)
    console.print(
        f"fleet / bare throughput ratio: {r['ratio']:.2f}   machine: {m['cpus']} cpus, {m['platform']}, "
        f"Python {m['python']}"
    )
