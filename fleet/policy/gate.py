"""The policies a pick consults, in one object: quotas, fair share, rate limiters, budgets. Pure.

The ledger tells the gate what changes (a task becomes active or stops being active, an attempt
ends with a runtime) and the waiting room asks it (:class:`fleet.policy.room.Judge`) whether a
tenant or a task may start now and in which order tenants and projects come.
"""

from __future__ import annotations

from fleet.core.tasks import Shape
from fleet.policy import quota
from fleet.policy.budget import Budgets, Notice
from fleet.policy.config import Policy
from fleet.policy.fairshare import FairShare
from fleet.policy.resources import Placement, describe, needs_placement
from fleet.policy.token_bucket import Limiters

DEFAULT_PROJECT = "default"


class Gate:
    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.loads: dict[str, quota.Load] = {}
        self.project_cores: dict[tuple[str, str], float] = {}
        self.share = FairShare(self.policy.fairshare.half_life)
        self.limiters = Limiters()
        self.placement = Placement()
        self.budgets = Budgets()
        self.holders: dict[str, dict[str, float]] = {}
        """Workers that asked each limiter for tokens lately (limiter -> worker -> when)."""

    def configure(self, policy: Policy, now: float = 0.0) -> None:
        self.policy = policy
        self.share.half_life_s = policy.fairshare.half_life
        self.limiters.configure(policy.limiters, now)

    def load(self, tenant: str) -> quota.Load:
        got = self.loads.get(tenant)
        if got is None:
            got = self.loads[tenant] = quota.Load()
        return got

    # -- what the ledger reports --------------------------------------------------------------------
    def active(self, tenant: str, project: str, shape: Shape, delta: int) -> None:
        """A task of ``tenant`` became active (+1: dispatched) or stopped being active (-1)."""
        load = self.load(tenant)
        cores = delta * shape.billing(self.policy.fairshare.gpu_weight)
        load.active += delta
        load.cores += cores
        key = (tenant, project)
        self.project_cores[key] = self.project_cores.get(key, 0.0) + cores

    def pending(self, tenant: str, delta: int) -> None:
        self.load(tenant).pending += delta

    def ran(self, tenant: str, project: str, shape: Shape, runtime_s: float, now: float) -> list[Notice]:
        """An attempt ended after ``runtime_s``: its usage counts in fair share and budgets; the
        budget warnings it crosses."""
        used = max(0.0, runtime_s) * shape.billing(self.policy.fairshare.gpu_weight)
        self.share.charge(tenant, used, now)
        self.share.charge(f"{tenant}/{project}", used, now)
        res = shape.resources
        return self.budgets.charge(tenant, self.policy.tenant(tenant), res.cpus, res.gpus, runtime_s, now)

    # -- what the room asks --------------------------------------------------------------------------
    def admit_block(self, tenant: str) -> str | None:
        load, tp = self.load(tenant), self.policy.tenant(tenant)
        return None if quota.can_admit(load, tp) else quota.refused_reason(tenant, load, tp)

    def tenant_block(self, tenant: str, now: float) -> str | None:
        load, tp = self.load(tenant), self.policy.tenant(tenant)
        if not quota.can_run(load, tp):
            return quota.held_reason(tenant, load, tp)
        if tp.cpu_hours is not None or tp.gpu_hours is not None:
            return self.budgets.status(tenant, tp, now).reason
        return None

    def tenant_key(self, tenant: str, now: float) -> float:
        return self.share.key(tenant, self.load(tenant).cores, self.policy.tenant(tenant).weight, now)

    def project_key(self, tenant: str, project: str, now: float) -> float:
        tp = self.policy.tenant(tenant).projects.get(project)
        weight = tp.weight if tp is not None else 1.0
        cores = self.project_cores.get((tenant, project), 0.0)
        return self.share.key(f"{tenant}/{project}", cores, weight, now)

    def shape_block(self, shape: Shape, queue: str, now: float) -> str | None:
        res = shape.resources
        if needs_placement(res) and self.placement.choose(queue, res) is None:
            return f"resources {describe(res)} (queue {queue})"
        for name, cost in shape.limits:
            bucket = self.limiters.get(name)
            if bucket is None:
                return f"rate {name}: no such limiter"
            if bucket.wait_for(cost, now) > 0:
                return f"rate {name}"
        return None

    def take(self, shape: Shape, now: float) -> None:
        """A task of this shape is dispatched: it pays its limiters' tokens (checked just before)."""
        for name, cost in shape.limits:
            bucket = self.limiters.get(name)
            if bucket is not None:
                bucket.take(cost, now)

    def lease(
        self, limiter: str, worker: str, want: float, now: float, lease_s: float
    ) -> tuple[float, float, str | None]:
        """Tokens for a worker's handlers: (granted, retry_in_s, reason)."""
        bucket = self.limiters.get(limiter)
        if bucket is None:
            return 0.0, 1.0, f"no limiter named {limiter}"
        seen = self.holders.setdefault(limiter, {})
        seen[worker] = now
        for w, at in list(seen.items()):
            if now - at > 2 * lease_s:
                del seen[w]
        granted = bucket.grant(want, now, len(seen), lease_s)
        return granted, (0.0 if granted > 0 else bucket.wait_for(min(want, 1.0), now)), None

    def throttled(self, limiter: str, now: float, retry_after: float | None) -> None:
        bucket = self.limiters.get(limiter)
        if bucket is not None:
            bucket.throttled(now, retry_after)
