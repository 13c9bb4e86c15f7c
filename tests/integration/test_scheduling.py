"""The scheduler schedules: quotas, priorities across a backlog, and a policy changed while it runs.

Real nats-server, the scheduler in-process (so a test can sample what it holds), and workers as
subprocesses or in-process tasks.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from conftest import Stack, WorkerProcs, wait_for

from broker import names, reader
from fleet.core.records import BudgetNotice


async def _max_overlap(fleet: Any, job: str) -> tuple[int, int]:
    """(results, most handlers running at once) from the outcomes' start and finish times."""
    edges: list[tuple[float, int]] = []
    n = 0
    async for report, _ in fleet.results(job):
        n += 1
        edges += [(report.started_at, 1), (report.finished_at, -1)]
    running = peak = 0
    for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
        running += d
        peak = max(peak, running)
    return n, peak


async def test_quota_50_of_100_run_and_the_rest_wait_then_start(
    stack: Stack, tmp_path: Path, spawn_worker: WorkerProcs
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("tenants:\n  lab-a: {max_running: 50}\n")
    sched = await stack.start_scheduler(policy_file=str(policy))
    for _ in range(2):
        spawn_worker(stack.url, concurrency=40)  # 80 slots: the quota, not the fleet, is the limit
    await wait_for(lambda: sched.slots().get("default", 0) == 80, timeout=30, what="80 slots")
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:slow", items=[1.0] * 100, tenant="lab-a")

    held = 0

    async def quota_shown() -> bool:
        nonlocal held
        held = max(held, sched.ledger.gate.load("lab-a").active)
        record = await fleet.job(job)
        return record is not None and record.waiting == "quota lab-a 50/50"

    await wait_for(quota_shown, timeout=20, what="the job record saying why it waits")
    record = await fleet.wait_job(job, timeout=60)
    assert record.counts == {"succeeded": 100}
    n, peak = await _max_overlap(fleet, job)
    assert n == 100 and peak == 50, (n, peak)
    assert held == 50


async def test_urgent_tasks_start_within_one_runway_drain_after_a_backlog(stack: Stack) -> None:
    sched = await stack.start_scheduler()
    fleet = await stack.connect()
    backlog = 100_000
    a = await fleet.submit_job("handlers:slow", items=[0.2] * backlog, tenant="tenant-a", qos="backfill")
    await wait_for(
        lambda: sched.ledger.jobs.get(a) is not None and sched.ledger.jobs[a].submitted == backlog,
        timeout=120,
        what="A's backlog indexed",
    )
    for _ in range(2):
        await stack.start_worker(concurrency=4)
    await wait_for(lambda: sched.ledger.active_by_queue.get("default", 0) >= 8, timeout=10, what="A running")
    sent = time.time()
    b = await fleet.submit_job("handlers:slow", items=[0.2] * 10, tenant="tenant-b", qos="urgent")
    record = await fleet.wait_job(b, timeout=20)
    assert record.counts == {"succeeded": 10}
    starts = sorted([r.started_at async for r, _ in fleet.results(b)])
    # the runway ahead of B: 8 slots + 2 headroom of 0.2 s tasks drain in well under a second;
    # B's 10 tasks then take two rounds of 8 slots
    assert starts[0] - sent < 2.0, starts[0] - sent
    assert sched.ledger.jobs[a].counts.get("queued", 0) > backlog - 2000  # type: ignore[call-overload]


async def test_policy_change_while_running(stack: Stack, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("tenants:\n  t: {max_running: 2}\n")
    sched = await stack.start_scheduler(policy_file=str(policy))
    await stack.start_worker(concurrency=8)
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:slow", items=[0.5] * 40, tenant="t")
    load = sched.ledger.gate.load
    await wait_for(lambda: load("t").active == 2, timeout=10, what="2 running")
    await asyncio.sleep(0.3)
    assert load("t").active == 2
    kv = await fleet.js.key_value(names.POLICY_BUCKET)
    await kv.put(names.POLICY_KEY, b"tenants:\n  t: {max_running: 6}\n")
    await wait_for(lambda: load("t").active == 6, timeout=10, what="6 running after the change")
    await kv.put(names.POLICY_KEY, b"tenants: {t: {max_running: -1}}\n")  # refused: kept as it was
    record = await fleet.wait_job(job, timeout=30)
    assert record.counts == {"succeeded": 40}
    assert sched.ledger.policy.tenant("t").max_running == 6


async def test_limiter_holds_its_rate_across_four_worker_processes(
    stack: Stack, tmp_path: Path, spawn_worker: WorkerProcs
) -> None:
    rate, burst, window = 40.0, 10.0, 30.0
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"limiters:\n  api-x: {{rate: {rate}, burst: {burst}}}\n")
    sched = await stack.start_scheduler(policy_file=str(policy))
    for _ in range(4):
        spawn_worker(stack.url, concurrency=1)
    await wait_for(lambda: sched.slots().get("default", 0) == 4, timeout=30, what="4 workers")
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:rate_calls", items=["api-x"] * 4, args=(window + 4,))
    record = await fleet.wait_job(job, timeout=window + 30)
    assert record.counts == {"succeeded": 4}
    values = [v async for _, v in fleet.results(job)]  # one list per task (a bundle of one item)
    calls = sorted(t for bundle in values for t in bundle[0])
    start = calls[0] + 2.0  # past the first burst and every worker's first lease
    inside = [t for t in calls if start <= t < start + window]
    assert abs(len(inside) - rate * window) <= 0.05 * rate * window, (len(inside), rate * window)


async def test_task_limits_are_paid_at_dispatch(stack: Stack, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("limiters:\n  api-y: {rate: 10, burst: 2}\n")
    sched = await stack.start_scheduler(policy_file=str(policy))
    await stack.start_worker(concurrency=8)
    fleet = await stack.connect()
    t0 = time.time()
    job = await fleet.submit_job("handlers:square", items=range(22), limits={"api-y": 1})
    record = await fleet.wait_job(job, timeout=20)
    assert record.counts == {"succeeded": 22}
    starts = sorted([r.started_at async for r, _ in fleet.results(job)])
    # 2 at once, then 10 a second: the last of 22 starts about 2 s after the first
    assert starts[-1] - starts[0] >= 1.6, starts[-1] - starts[0]
    assert time.time() - t0 < 15
    assert sched.ledger.gate.limiters.get("api-y") is not None


async def test_tasks_go_only_to_workers_with_their_resources(stack: Stack) -> None:
    sched = await stack.start_scheduler()
    a100 = await stack.start_worker(concurrency=4, gpus=2, labels={"gpu": "a100"}, worker_id="w-a100")
    t4 = await stack.start_worker(concurrency=4, gpus=1, labels={"gpu": "t4"}, worker_id="w-t4")
    await wait_for(lambda: len(sched.ledger.gate.placement.machines) == 2, timeout=10, what="2 workers")
    fleet = await stack.connect()
    big = await fleet.submit_job(
        "handlers:slow", items=[0.4] * 6, resources={"gpus": 1, "labels": {"gpu": "a100"}}
    )
    small = await fleet.submit_job(
        "handlers:slow", items=[0.4] * 3, resources={"gpus": 1, "labels": {"gpu": "t4"}}
    )
    never = await fleet.submit_job("handlers:slow", items=[0.1], resources={"gpus": 8})
    assert (await fleet.wait_job(big, timeout=20)).counts == {"succeeded": 6}
    assert (await fleet.wait_job(small, timeout=20)).counts == {"succeeded": 3}
    assert {r.worker_id async for r, _ in fleet.results(big)} == {a100.worker_id}
    assert {r.worker_id async for r, _ in fleet.results(small)} == {t4.worker_id}
    assert (await _max_overlap(fleet, big))[1] <= 2  # two GPUs: never booked twice
    assert (await _max_overlap(fleet, small))[1] == 1
    record = await fleet.wait_job(never, timeout=10)
    assert record.counts == {"dead": 1}
    (state,) = [r async for r in fleet.tasks(never)]
    assert (
        state.reason is not None and "needs gpus=8, more than any worker of queue default has" in state.reason
    )


async def test_a_budget_warns_then_holds_until_it_is_raised(stack: Stack, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"  # 0.001 CPU-hours = 3.6 CPU-seconds
    policy.write_text("tenants:\n  lab: {cpu_hours: 0.001, warn_at: [0.5], on_budget: hold}\n")
    sched = await stack.start_scheduler(policy_file=str(policy))
    await stack.start_worker(concurrency=2)
    fleet = await stack.connect()
    job = await fleet.submit_job("handlers:slow", items=[0.5] * 30, tenant="lab")

    async def held() -> bool:
        record = await fleet.job(job)
        return record is not None and (record.waiting or "").startswith("budget lab cpu-hours")

    await wait_for(held, timeout=30, what="the job held by its tenant's budget")
    record = await fleet.job(job)
    assert record is not None and 6 <= record.counts.get("succeeded", 0) < 30
    await asyncio.sleep(1.0)  # held: nothing more starts
    assert sched.ledger.gate.load("lab").active == 0
    notices = [
        BudgetNotice.from_wire(m.data)
        async for m in reader.replay(fleet.js, names.EVENTS_STREAM, names.budget_notice_subject("lab"))
    ]
    assert [(n.threshold, n.held) for n in notices] == [(0.5, False), (1.0, True)]
    assert "reached its cpu-hours budget" in notices[-1].message
    kv = await fleet.js.key_value(names.POLICY_BUCKET)
    await wait_for(lambda: _usage_saved(kv), timeout=10, what="usage in KV")
    await kv.put(names.POLICY_KEY, b"tenants:\n  lab: {cpu_hours: 1000}\n")
    record = await fleet.wait_job(job, timeout=30)
    assert record.counts == {"succeeded": 30}


async def _usage_saved(kv: Any) -> bool:
    try:
        entry = await kv.get(names.usage_key("lab"))
    except Exception:
        return False
    return json.loads(entry.value)["cpu_s"] >= 3.6
