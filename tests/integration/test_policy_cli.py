"""``fleet policy|quota|limit|prioritize|usage`` and the waiting reason in ``fleet status``, as real
subprocesses against a real server with the scheduler in-process."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Stack, wait_for
from test_cli import fleet

from broker import names
from fleet.core.records import PrioritizeRequest


async def test_policy_set_show_check_and_a_bad_file(stack: Stack, tmp_path: Path) -> None:
    sched = await stack.start_scheduler()
    url = stack.url
    good = tmp_path / "good.yaml"
    good.write_text(
        "tenants:\n  lab-a: {weight: 2, max_running: 50}\nlimiters:\n  api-x: {rate: 100, burst: 20}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  lab-a: {weight: 0}\n")
    r = await fleet("policy", "check", str(bad), home=tmp_path)
    assert r.rc == 2 and "tenants.lab-a.weight" in r.err_text, r
    r = await fleet("policy", "set", str(bad), "--nats", url, home=tmp_path)
    assert r.rc == 2 and "greater than 0" in r.err_text, r
    r = await fleet("policy", "set", str(good), "--nats", url, home=tmp_path)
    assert r.rc == 0 and "tenants changed: lab-a" in r.out, r
    await wait_for(
        lambda: sched.ledger.policy.tenant("lab-a").max_running == 50, what="the scheduler applies it"
    )
    r = await fleet("policy", "show", "--json", "--nats", url, home=tmp_path)
    shown = json.loads(r.out)
    assert (
        shown["policy"]["tenants"]["lab-a"]["weight"] == 2
        and shown["policy"]["limiters"]["api-x"]["rate"] == 100
    )
    r = await fleet("scheduler", "--policy", str(bad), "--nats", url, home=tmp_path)
    assert r.rc == 2 and "tenants.lab-a.weight" in r.err_text, r


async def test_quota_and_limit_change_one_entry_and_keep_the_rest(stack: Stack, tmp_path: Path) -> None:
    sched = await stack.start_scheduler()
    url = stack.url
    r = await fleet(
        "quota", "lab-a", "--max-running", "50", "--cpu-hours", "1000", "--nats", url, home=tmp_path
    )
    assert r.rc == 0 and "max_running 50" in r.out, r
    r = await fleet("quota", "lab-b", "--weight", "3", "--json", "--nats", url, home=tmp_path)
    assert json.loads(r.out)["weight"] == 3
    r = await fleet("quota", "lab-a", "--json", "--nats", url, home=tmp_path)
    a = json.loads(r.out)
    assert (a["max_running"], a["cpu_hours"]) == (50, 1000)  # lab-b's change kept lab-a's
    r = await fleet("quota", "lab-a", "--max-running", "none", "--json", "--nats", url, home=tmp_path)
    assert json.loads(r.out)["max_running"] is None
    r = await fleet("quota", "lab-a", "--on-budget", "sometimes", "--nats", url, home=tmp_path)
    assert r.rc == 2 and "on_budget" in r.err_text, r
    r = await fleet("limit", "api-x", "--rate", "100", "--burst", "20", "--nats", url, home=tmp_path)
    assert r.rc == 0 and "api-x" in r.out, r
    await wait_for(lambda: sched.ledger.gate.limiters.get("api-x") is not None, what="the limiter")
    r = await fleet("limit", "api-x", "--remove", "--json", "--nats", url, home=tmp_path)
    assert json.loads(r.out) == {}
    await wait_for(lambda: sched.ledger.gate.limiters.get("api-x") is None, what="the limiter gone")
    assert sched.ledger.policy.tenant("lab-b").weight == 3


async def test_status_says_why_a_job_waits_and_prioritize_is_sent(stack: Stack, tmp_path: Path) -> None:
    sched = await stack.start_scheduler()
    client = await stack.connect()
    url = stack.url
    await client.set_policy("tenants:\n  lab-a: {max_running: 2}\n")
    await wait_for(lambda: sched.ledger.policy.tenant("lab-a").max_running == 2, what="the policy applied")
    await stack.start_worker(concurrency=4)
    job = await client.submit_job("handlers:slow", items=[2.0] * 5, tenant="lab-a")

    async def held() -> bool:
        record = await client.job(job)
        return record is not None and record.waiting == "quota lab-a 2/2"

    await wait_for(held, timeout=15, what="the quota reason")
    r = await fleet("status", job, "--json", "--nats", url, home=tmp_path)
    assert json.loads(r.out)["waiting"] == "quota lab-a 2/2", r
    r = await fleet("status", "--nats", url, home=tmp_path, COLUMNS="200")
    assert "queued: quota lab-a 2/2" in r.out, r
    r = await fleet("prioritize", job, "8", "--nats", url, home=tmp_path)
    assert r.rc == 0, r
    msg = await client.js.get_last_msg(names.INTAKE_STREAM, f"fleet.intake.prio.{job}.>")
    req = PrioritizeRequest.from_wire(msg.data or b"")
    assert (req.job_id, req.priority) == (job, 8)
    await wait_for(lambda: _job_priority(client, job, 8), timeout=10, what="the job's new priority")
    r = await fleet("prioritize", job, "--qos", "gold", "--nats", url, home=tmp_path)
    assert r.rc == 1 and "unknown QoS class 'gold'" in r.err_text, r


async def _job_priority(client: object, job: str, want: int) -> bool:
    record = await client.job(job)  # type: ignore[attr-defined]
    return record is not None and record.priority == want


async def test_usage_reports_what_tenants_ran(stack: Stack, tmp_path: Path) -> None:
    await stack.start_scheduler()
    client = await stack.connect()
    await client.set_policy("tenants:\n  lab-a: {cpu_hours: 10}\n")
    await stack.start_worker(concurrency=4)
    job = await client.submit_job("handlers:slow", items=[0.3] * 4, tenant="lab-a", resources={"cpus": 2})
    await client.wait_job(job, timeout=20)

    async def saved() -> bool:
        return "lab-a" in await client.usage()

    await wait_for(saved, timeout=15, what="usage saved")
    r = await fleet("usage", "--json", "--nats", stack.url, home=tmp_path)
    out = json.loads(r.out)
    (row,) = out["tenants"]
    assert row["tenant"] == "lab-a" and row["cpu_budget"] == 10 and not row["held"]
    assert 4 * 0.3 * 2 / 3600 * 0.9 <= row["cpu_hours"] <= 4 * 0.3 * 2 / 3600 * 2
    (day,) = out["days"]
    assert day["tasks"] == 4
    r = await fleet("usage", "--since", "soon", "--nats", stack.url, home=tmp_path)
    assert r.rc == 2 and "--since" in r.err_text, r
