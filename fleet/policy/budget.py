"""CPU-hour and GPU-hour budgets per tenant, and the usage accounting behind them. Pure.

Every attempt that ends is charged to its tenant: runtime x requested cpus (CPU-seconds) and
runtime x requested gpus (GPU-seconds), into the current *period* (fixed periods of
``TenantPolicy.period`` counted from ``budget_start``) and into a per-day row kept for
``KEEP_DAYS`` (what ``fleet usage --since`` reads). When a charge crosses one of ``warn_at``
(80 % and 95 % by default) or 100 % of a budget, a :class:`Notice` is raised once per period; at
100 % a tenant whose policy says ``on_budget: hold`` gets no new dispatches until the next period
(or a bigger budget), while its running tasks finish. Accounts are plain dicts for KV.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fleet.policy.config import TenantPolicy

KEEP_DAYS = 400
RESOURCES = ("cpu-hours", "gpu-hours")


def period_index(policy: TenantPolicy, now: float) -> int:
    return int((now - policy.budget_start) // policy.period)


def period_bounds(policy: TenantPolicy, now: float) -> tuple[float, float]:
    start = policy.budget_start + period_index(policy, now) * policy.period
    return start, start + policy.period


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    tenant: str
    resource: str
    used: float
    limit: float
    threshold: float
    held: bool
    at: float

    @property
    def message(self) -> str:
        what = "reached" if self.threshold >= 1 else f"passed {self.threshold:.0%} of"
        tail = ": new work is held" if self.held else ""
        return (
            f"tenant {self.tenant} {what} its {self.resource} budget ({self.used:.1f}/{self.limit:g}){tail}"
        )


@dataclasses.dataclass(slots=True)
class Account:
    period: int = 0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    tasks: int = 0
    warned: set[str] = dataclasses.field(default_factory=set)
    """Thresholds already announced this period (``cpu-hours:0.8``)."""
    days: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """UTC day -> [cpu_s, gpu_s, tasks]."""

    def used(self, resource: str) -> float:
        return (self.cpu_s if resource == "cpu-hours" else self.gpu_s) / 3600.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "cpu_s": self.cpu_s,
            "gpu_s": self.gpu_s,
            "tasks": self.tasks,
            "warned": sorted(self.warned),
            "days": self.days,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Account:
        if not isinstance(data, dict):
            raise ValueError("usage account: expected a mapping")
        try:
            days = {str(d): [float(x) for x in row][:3] for d, row in dict(data.get("days", {})).items()}
            return cls(
                period=int(data.get("period", 0)),
                cpu_s=float(data.get("cpu_s", 0.0)),
                gpu_s=float(data.get("gpu_s", 0.0)),
                tasks=int(data.get("tasks", 0)),
                warned={str(w) for w in data.get("warned", [])},
                days=days,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"usage account: {exc}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetStatus:
    used: dict[str, float]
    limits: dict[str, float | None]
    held: bool
    reason: str | None


class Budgets:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.dirty: set[str] = set()

    def account(self, tenant: str, policy: TenantPolicy, now: float) -> Account:
        acct = self.accounts.setdefault(tenant, Account(period=period_index(policy, now)))
        period = period_index(policy, now)
        if acct.period != period:  # a new period: budgets start again
            acct.period, acct.cpu_s, acct.gpu_s, acct.tasks, acct.warned = period, 0.0, 0.0, 0, set()
            self.dirty.add(tenant)
        return acct

    def charge(
        self, tenant: str, policy: TenantPolicy, cpus: float, gpus: int, runtime_s: float, now: float
    ) -> list[Notice]:
        """Charge one finished attempt; the warnings it newly crosses."""
        runtime_s = max(0.0, runtime_s)
        acct = self.account(tenant, policy, now)
        acct.cpu_s += runtime_s * cpus
        acct.gpu_s += runtime_s * gpus
        acct.tasks += 1
        row = acct.days.setdefault(_day(now), [0.0, 0.0, 0.0])
        row[0] += runtime_s * cpus
        row[1] += runtime_s * gpus
        row[2] += 1
        if len(acct.days) > KEEP_DAYS:
            for old in sorted(acct.days)[: len(acct.days) - KEEP_DAYS]:
                del acct.days[old]
        self.dirty.add(tenant)
        return self._notices(tenant, policy, acct, now)

    def _notices(self, tenant: str, policy: TenantPolicy, acct: Account, now: float) -> list[Notice]:
        out: list[Notice] = []
        for resource, limit in zip(RESOURCES, (policy.cpu_hours, policy.gpu_hours), strict=True):
            if limit is None:
                continue
            used = acct.used(resource)
            for threshold in sorted({*policy.warn_at, 1.0}):
                key = f"{resource}:{threshold:g}"
                crossed = used >= threshold * limit if limit > 0 else True
                if crossed and key not in acct.warned:
                    acct.warned.add(key)
                    held = threshold >= 1.0 and policy.on_budget == "hold"
                    out.append(Notice(tenant, resource, used, limit, threshold, held, now))
        return out

    def status(self, tenant: str, policy: TenantPolicy, now: float) -> BudgetStatus:
        acct = self.accounts.get(tenant)
        if acct is not None and acct.period != period_index(policy, now):
            acct = None  # its period is over: nothing used in this one yet
        used = {r: (acct.used(r) if acct else 0.0) for r in RESOURCES}
        limits = {"cpu-hours": policy.cpu_hours, "gpu-hours": policy.gpu_hours}
        if policy.on_budget == "hold":
            for r in RESOURCES:
                limit = limits[r]
                if limit is not None and used[r] >= limit:
                    return BudgetStatus(used, limits, True, f"budget {tenant} {r} {used[r]:.1f}/{limit:g}")
        return BudgetStatus(used, limits, False, None)

    def usage(self, tenant: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Rows per tenant per UTC day (oldest first), for ``fleet usage``."""
        first = _day(since) if since is not None else ""
        rows = []
        for name in sorted(self.accounts):
            if tenant is not None and name != tenant:
                continue
            for day, (cpu_s, gpu_s, tasks) in sorted(self.accounts[name].days.items()):
                if day >= first:
                    rows.append(
                        {
                            "tenant": name,
                            "day": day,
                            "cpu_hours": cpu_s / 3600,
                            "gpu_hours": gpu_s / 3600,
                            "tasks": int(tasks),
                        }
                    )
        return rows

    def take_dirty(self) -> dict[str, dict[str, Any]]:
        out = {t: self.accounts[t].to_dict() for t in sorted(self.dirty) if t in self.accounts}
        self.dirty = set()
        return out

    def load(self, tenant: str, data: Any) -> None:
        self.accounts[tenant] = Account.from_dict(data)
