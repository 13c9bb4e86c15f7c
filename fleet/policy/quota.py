"""Tenant quotas: how many tasks a tenant may have running and waiting. Pure.

``max_running`` counts tasks dispatched or running (a dispatched task holds a slot the moment a
worker pulls it), over all queues; a tenant at its cap is skipped by the waiting room until one of
its tasks ends. ``max_pending`` counts tasks queued or retrying; a submission beyond it is refused.
"""

from __future__ import annotations

import dataclasses

from fleet.policy.config import TenantPolicy


@dataclasses.dataclass(slots=True)
class Load:
    """What one tenant holds now."""

    active: int = 0
    """Tasks dispatched or running."""
    pending: int = 0
    """Tasks queued or retrying."""
    cores: float = 0.0
    """Billing cores of its active tasks (cpus + gpu_weight x gpus)."""


def can_run(load: Load, policy: TenantPolicy) -> bool:
    return policy.max_running is None or load.active < policy.max_running


def can_admit(load: Load, policy: TenantPolicy) -> bool:
    return policy.max_pending is None or load.pending < policy.max_pending


def held_reason(tenant: str, load: Load, policy: TenantPolicy) -> str:
    return f"quota {tenant} {load.active}/{policy.max_running}"


def refused_reason(tenant: str, load: Load, policy: TenantPolicy) -> str:
    return f"tenant {tenant} already has {load.pending} tasks waiting (max_pending {policy.max_pending})"
