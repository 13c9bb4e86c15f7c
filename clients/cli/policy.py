"""``fleet policy|quota|limit|prioritize|usage``: the scheduling policy from the command line.

The policy lives in KV (``fleet_policy``); these verbs read it, change it with compare-and-set,
and the running scheduler applies each change at its next pick. ``fleet usage`` reads the usage
accounts the scheduler saves there.
"""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from clients.sdk.client import FleetClient
from fleet.policy import config
from fleet.policy.budget import period_bounds

NatsOpt = Annotated[
    str | None, typer.Option("--nats", help="NATS server URL(s). Default: $FLEET_NATS_URL or embedded.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
policy_app = typer.Typer(no_args_is_help=True, help="Show, check or replace the scheduling policy.")


def _cli() -> Any:
    from clients.cli import main  # the shared error handling (imported late: main imports us)

    return main


def _with_fleet(nats: str | None, fn: Any) -> Any:
    cli = _cli()
    url = cli._url_or_fail(nats)

    async def go() -> Any:
        async with await FleetClient.connect(url) as fleet:
            return await fn(fleet)

    return cli._run(go)


def _load_file(path: Path) -> config.Policy:
    try:
        return config.load_file(str(path))
    except config.PolicyError as exc:
        _cli()._fail(str(exc), 2)
    raise AssertionError("unreachable")


@policy_app.command("show")
def show(nats: NatsOpt = None, as_json: JsonOpt = False) -> None:
    """Print the stored policy (YAML; the defaults when none is stored)."""

    async def get(fleet: FleetClient) -> tuple[config.Policy, int]:
        return await fleet.policy()

    policy, rev = _with_fleet(nats, get)
    if as_json:
        print(json.dumps({"revision": rev, "policy": policy.model_dump(mode="json")}, indent=2))
    else:
        print(f"# revision {rev}" + (" (none stored: defaults)" if rev == 0 else "") + "; defaults left out")
        print(policy.to_yaml(), end="")


@policy_app.command("check")
def check(file: Path) -> None:
    """Check a policy file; exit 2 with the bad entry named if it is wrong."""
    p = _load_file(file)
    print(f"{file}: ok ({len(p.tenants)} tenants, {len(p.limiters)} limiters, {len(p.qos)} QoS classes)")


@policy_app.command("set")
def set_(file: Path, nats: NatsOpt = None) -> None:
    """Check FILE and store it as the policy; the running scheduler applies it at once."""
    new = _load_file(file)

    async def put(fleet: FleetClient) -> tuple[config.Policy, int]:
        old, _ = await fleet.policy()
        return old, await fleet.set_policy(new)

    old, rev = _with_fleet(nats, put)
    changed = sorted(
        set(old.tenants) ^ set(new.tenants) | {t for t in new.tenants if old.tenants.get(t) != new.tenants[t]}
    )
    limits = sorted(
        set(old.limiters) ^ set(new.limiters)
        | {n for n in new.limiters if old.limiters.get(n) != new.limiters[n]}
    )
    print(f"policy stored (revision {rev}); tenants changed: {', '.join(changed) or 'none'}; "
          f"limiters changed: {', '.join(limits) or 'none'}")  # fmt: skip


def _change(nats: str | None, change: Any) -> config.Policy:
    """Apply ``change`` (Policy -> Policy) to the stored policy with compare-and-set, or just read
    it when ``change`` is None; a change that makes the policy invalid exits 2 naming the entry."""

    async def go(fleet: FleetClient) -> config.Policy:
        return await fleet.update_policy(change) if change is not None else (await fleet.policy())[0]

    try:
        policy: config.Policy = _with_fleet(nats, go)
    except config.PolicyError as exc:
        _cli()._fail(str(exc), 2)
    return policy


def _opt_int(value: str | None, what: str) -> tuple[bool, int | None]:
    """(given, value) for options that take a number or ``none`` (no cap)."""
    if value is None:
        return False, None
    if value.lower() in ("none", "unlimited", "-"):
        return True, None
    try:
        n = int(value)
    except ValueError:
        _cli()._fail(f"--{what}: expected a whole number or 'none', got {value!r}", 2)
    if n < 0:
        _cli()._fail(f"--{what}: must not be negative", 2)
    return True, n


def quota(
    tenant: str,
    max_running: Annotated[
        str | None, typer.Option(help="Most tasks dispatched or running ('none': no cap).")
    ] = None,
    max_pending: Annotated[str | None, typer.Option(help="Most tasks waiting ('none': no cap).")] = None,
    weight: Annotated[float | None, typer.Option(help="Fair-share weight.")] = None,
    cpu_hours: Annotated[float | None, typer.Option(help="CPU-hour budget per period.")] = None,
    gpu_hours: Annotated[float | None, typer.Option(help="GPU-hour budget per period.")] = None,
    period: Annotated[str | None, typer.Option(help="Budget period, e.g. 30d.")] = None,
    on_budget: Annotated[str | None, typer.Option(help="hold or warn at 100 % of a budget.")] = None,
    nats: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or change one tenant's quotas, weight and budgets (other tenants are kept)."""
    changes: dict[str, Any] = {}
    for name, raw in (("max_running", max_running), ("max_pending", max_pending)):
        given, value = _opt_int(raw, name.replace("_", "-"))
        if given:
            changes[name] = value
    for name, v in (("weight", weight), ("cpu_hours", cpu_hours), ("gpu_hours", gpu_hours)):
        if v is not None:
            changes[name] = v
    if period is not None:
        changes["period"] = period
    if on_budget is not None:
        changes["on_budget"] = on_budget

    def change(p: config.Policy) -> config.Policy:
        data = p.model_dump(mode="json")
        data.setdefault("tenants", {})
        data["tenants"][tenant] = {**p.tenant(tenant).model_dump(mode="json"), **changes}
        return config.load(yaml.safe_dump(data), f"quota {tenant}")

    policy = _change(nats, change if changes else None)
    t = policy.tenant(tenant)
    if as_json:
        print(json.dumps({"tenant": tenant, **t.model_dump(mode="json")}, indent=2))
        return
    listed = "" if tenant in policy.tenants else " (not listed: the defaults)"
    print(f"tenant {tenant}{listed}: weight {t.weight:g}, max_running {t.max_running}, "
          f"max_pending {t.max_pending}, cpu_hours {t.cpu_hours}, gpu_hours {t.gpu_hours} "
          f"per {t.period / 86400:g}d, on_budget {t.on_budget}")  # fmt: skip


def limit(
    name: Annotated[str | None, typer.Argument(help="Limiter name; none lists them.")] = None,
    rate: Annotated[float | None, typer.Option(help="Tokens per second.")] = None,
    burst: Annotated[float | None, typer.Option(help="Most tokens at once.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the limiter.")] = False,
    nats: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the rate limiters, or add, change or remove one (``fleet limit api-x --rate 100 --burst 20``)."""
    if name is not None and not remove and rate is None and burst is not None:
        _cli()._fail("--burst needs --rate", 2)

    def change(p: config.Policy) -> config.Policy:
        data = p.model_dump(mode="json")
        limiters = data.setdefault("limiters", {})
        if remove:
            limiters.pop(name, None)
        else:
            kept = p.limiters[name].burst if name in p.limiters else None
            limiters[name] = {"rate": rate, "burst": burst if burst is not None else kept}
        return config.load(yaml.safe_dump(data), f"limit {name}")

    policy = _change(nats, change if name is not None and (remove or rate is not None) else None)
    rows = {n: lp.model_dump(mode="json") for n, lp in sorted(policy.limiters.items())}
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("limiter", "rate/s", "burst")
    for n, lp in sorted(policy.limiters.items()):
        table.add_row(n, f"{lp.rate:g}", f"{lp.capacity:g}")
    Console().print(table)


def prioritize(
    job: str,
    priority: Annotated[int | None, typer.Argument(min=0, max=9, help="0..9, 9 runs first.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Only this task (repeatable).")] = None,
    qos: Annotated[str | None, typer.Option(help="Move the job to this QoS class.")] = None,
    nats: NatsOpt = None,
) -> None:
    """Change the priority (or QoS class) of a job's waiting tasks."""
    if priority is None and qos is None:
        _cli()._fail("give a priority (0..9) or --qos", 2)

    async def go(fleet: FleetClient) -> str:
        known = (await fleet.policy())[0].qos
        if qos is not None and qos not in known:
            raise ValueError(f"unknown QoS class {qos!r} (known: {', '.join(sorted(known))})")
        return await fleet.prioritize(job, priority, qos=qos, task_ids=task)

    request = _with_fleet(nats, go)
    print(f"prioritize request {request} sent for {job}")


def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[str | None, typer.Option(help="Days from this date (YYYY-MM-DD) or age (30d).")] = None,
    nats: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """CPU- and GPU-hours used per tenant: this budget period against its budgets, and per day."""
    from fleet.policy.budget import Budgets

    start = _since(since)

    async def go(fleet: FleetClient) -> tuple[dict[str, Any], config.Policy]:
        return await fleet.usage(), (await fleet.policy())[0]

    accounts, policy = _with_fleet(nats, go)
    b = Budgets()
    for name, data in accounts.items():
        if tenant is None or name == tenant:
            b.load(name, data)
    now = time.time()
    summary = []
    for name in sorted(b.accounts):
        tp = policy.tenant(name)
        st = b.status(name, tp, now)
        begin, end = period_bounds(tp, now)
        summary.append({
            "tenant": name,
            "period": [time.strftime("%Y-%m-%d", time.gmtime(begin)), time.strftime("%Y-%m-%d", time.gmtime(end))],
            "cpu_hours": round(st.used["cpu-hours"], 3),
            "cpu_budget": tp.cpu_hours,
            "gpu_hours": round(st.used["gpu-hours"], 3),
            "gpu_budget": tp.gpu_hours,
            "held": st.held,
            "warnings": sorted(b.accounts[name].warned),
        })  # fmt: skip
    days = b.usage(tenant, start)
    if as_json:
        print(json.dumps({"tenants": summary, "days": days}, indent=2))
        return
    table = Table("tenant", "period", "cpu-hours", "gpu-hours", "warnings", "held")
    for s in summary:
        cpu = f"{s['cpu_hours']:.2f}" + (f" / {s['cpu_budget']:g}" if s["cpu_budget"] is not None else "")
        gpu = f"{s['gpu_hours']:.2f}" + (f" / {s['gpu_budget']:g}" if s["gpu_budget"] is not None else "")
        table.add_row(
            s["tenant"],
            " .. ".join(s["period"]),
            cpu,
            gpu,
            " ".join(s["warnings"]),
            "yes" if s["held"] else "",
        )
    Console().print(table)
    if days:
        daily = Table("tenant", "day", "cpu-hours", "gpu-hours", "tasks")
        for r in days:
            daily.add_row(
                r["tenant"], r["day"], f"{r['cpu_hours']:.2f}", f"{r['gpu_hours']:.2f}", str(r["tasks"])
            )
        Console().print(daily)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        pass
    try:
        return time.time() - float(config.parse_duration(value))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        _cli()._fail(f"--since: expected a date (YYYY-MM-DD) or an age (30d), got {value!r}", 2)
    raise AssertionError("unreachable")


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
    app.command()(quota)
    app.command()(limit)
    app.command()(prioritize)
    app.command()(usage)
