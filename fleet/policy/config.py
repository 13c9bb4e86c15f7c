"""The scheduling policy file: tenants, weights, quotas, budgets, limiters, QoS classes. Pure.

One YAML document, given as ``fleet scheduler --policy FILE`` and kept in the ``fleet_policy`` KV
bucket, where ``fleet policy set`` changes it while the scheduler runs::

    tenants:
      lab-a: {weight: 2, max_running: 50, max_pending: 1000000, cpu_hours: 1000, gpu_hours: 50,
              period: 30d, on_budget: hold, projects: {climate: {weight: 3}}}
    limiters:
      api-x: {rate: 100, burst: 20}   # tokens per second
    qos:
      urgent: {rank: 0}
      normal: {rank: 1, max_wait: 10m}
      backfill: {rank: 2, max_wait: 1h}

Every field is checked when the file is loaded; an error names the bad entry
(``tenants.lab-a.weight: Input should be greater than 0``). Durations are seconds or a number
with a unit (``90s``, ``10m``, ``6h``, ``30d``, ``2w``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from broker import names
from fleet.core.records import describe

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
DEFAULT_QOS = "normal"


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the bad entry."""


def parse_duration(v: object) -> object:
    if isinstance(v, str):
        m = _DURATION.fullmatch(v)
        if m is None:
            raise ValueError(f"{v!r} is not a duration (use e.g. 90s, 10m, 6h, 30d)")
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    return v


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, le=10 * 366 * 86400.0)]


def _name(v: str) -> str:
    return names.check_token(v, "name")


Name = Annotated[str, BeforeValidator(_name)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ProjectPolicy(_Model):
    weight: float = Field(default=1.0, gt=0, le=1e6)


class TenantPolicy(_Model):
    weight: float = Field(default=1.0, gt=0, le=1e6)
    """Fair-share weight among tenants: twice the weight, twice the share when all are busy."""
    max_running: int | None = Field(default=None, ge=0)
    """Most tasks dispatched or running at once, over all queues (None: no cap)."""
    max_pending: int | None = Field(default=None, ge=0)
    """Most tasks waiting (queued or retrying); submissions beyond it are refused (``rejected``)."""
    cpu_hours: float | None = Field(default=None, ge=0)
    """CPU-hours per period: runtime x requested cpus of every finished attempt."""
    gpu_hours: float | None = Field(default=None, ge=0)
    period: Duration = 30 * 86400.0
    """Budgets start again every period, counted from ``budget_start``."""
    budget_start: float = Field(default=1767225600.0, ge=0)
    """Epoch seconds where periods are counted from (default 2026-01-01 UTC)."""
    on_budget: Literal["hold", "warn"] = "hold"
    """At 100 % of a budget: hold the tenant's new work, or only warn."""
    warn_at: tuple[float, ...] = (0.8, 0.95)
    """Fractions of a budget at which a warning is raised (an event, and in ``fleet usage``)."""
    qos: Name | None = None
    """Default QoS class of the tenant's jobs."""
    projects: dict[Name, ProjectPolicy] = {}

    @model_validator(mode="after")
    def _warnings(self) -> Self:
        if any(not 0 < w <= 1 for w in self.warn_at):
            raise ValueError("warn_at fractions must be in (0, 1]")
        return self


class LimiterPolicy(_Model):
    rate: float = Field(gt=0, le=1e7)
    """Tokens per second."""
    burst: float | None = Field(default=None, gt=0, le=1e9)
    """Most tokens that can be taken at once after a quiet spell (default: one second's worth)."""

    @property
    def capacity(self) -> float:
        return self.burst if self.burst is not None else max(self.rate, 1.0)


class QosPolicy(_Model):
    rank: int = Field(ge=0, le=100)
    """Lower ranks go first, across all tenants."""
    max_wait: Duration | None = None
    """A class with waiting work gets the next free slot once it has gone this long without one
    (its starvation bound); None for the top class."""


def _default_qos() -> dict[str, QosPolicy]:
    return {
        "urgent": QosPolicy(rank=0),
        "normal": QosPolicy(rank=1, max_wait=600.0),
        "backfill": QosPolicy(rank=2, max_wait=3600.0),
    }


class FairSharePolicy(_Model):
    half_life: Duration = 7 * 86400.0
    """Past usage counts half as much after this long (Slurm's PriorityDecayHalfLife)."""
    gpu_weight: float = Field(default=8.0, ge=0, le=1e6)
    """A GPU counts as this many CPUs in fair-share usage."""


class RunwayPolicy(_Model):
    headroom: float = Field(default=0.1, ge=0, le=10)
    """Tasks dispatched ahead of free slots, as a fraction of the queue's slots."""
    min_headroom: int = Field(default=2, ge=0, le=100_000)
    ahead_s: float = Field(default=0.3, ge=0, le=3600)
    """For short tasks: also keep this many seconds of the queue's finish rate dispatched ahead,
    so workers never wait for the scheduler's round trip (at most 10x the slots)."""


class Policy(_Model):
    tenants: dict[Name, TenantPolicy] = {}
    defaults: TenantPolicy = TenantPolicy()
    """What a tenant not listed gets."""
    limiters: dict[Name, LimiterPolicy] = {}
    qos: dict[Name, QosPolicy] = Field(default_factory=_default_qos)
    fairshare: FairSharePolicy = FairSharePolicy()
    runway: RunwayPolicy = RunwayPolicy()

    @model_validator(mode="after")
    def _refs(self) -> Self:
        if DEFAULT_QOS not in self.qos:
            raise ValueError(f"qos: the class {DEFAULT_QOS!r} must exist (it is the default)")
        for tname, t in [("defaults", self.defaults), *self.tenants.items()]:
            if t.qos is not None and t.qos not in self.qos:
                raise ValueError(f"tenants.{tname}.qos: unknown class {t.qos!r} (known: {sorted(self.qos)})")
        return self

    def tenant(self, name: str) -> TenantPolicy:
        return self.tenants.get(name, self.defaults)

    def qos_of(self, name: str | None, tenant: str) -> str:
        """The class a task runs in: its own if known, else its tenant's default."""
        if name is not None and name in self.qos:
            return name
        return self.tenant(tenant).qos or DEFAULT_QOS

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False) if data else "{}\n"


def load(text: str, where: str = "policy") -> Policy:
    """Parse and check a policy document; :class:`PolicyError` names what is wrong."""
    try:
        data: Any = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        why = describe(exc, "policy").removeprefix("policy: ").replace("(record): Value error, ", "")
        raise PolicyError(f"{where}: {why.replace('Value error, ', '')}") from None


def load_file(path: str) -> Policy:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    return load(text, path)
