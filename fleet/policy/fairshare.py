"""Weighted fair share with decayed usage (Slurm's half-life model). Pure.

Each account (a tenant, or ``tenant/project``) has usage in core-seconds, charged when an attempt
ends (runtime x cpus, a GPU counting ``gpu_weight`` cpus) and halved every ``half_life``. The
share key of an account is::

    (cores it holds now + its recent average cores) / weight

where the recent average is the decayed usage divided by the decay's time constant
(``half_life / ln 2``): an account that ran ``c`` cores for a long time averages ``c``. The
account with the smallest key gets the next free slot, so equal weights split the slots equally,
twice the weight gets twice the slots, and an account that used much lately yields to one that
did not.
"""

from __future__ import annotations

import math
from typing import Any


class FairShare:
    def __init__(self, half_life_s: float = 7 * 86400.0) -> None:
        self.half_life_s = half_life_s
        self._usage: dict[str, tuple[float, float]] = {}  # account -> (core-seconds, at)

    def usage(self, account: str, now: float) -> float:
        """Decayed core-seconds of ``account`` at ``now``."""
        value, at = self._usage.get(account, (0.0, now))
        if value <= 0.0:
            return 0.0
        return value * math.pow(0.5, max(0.0, now - at) / self.half_life_s)

    def charge(self, account: str, core_seconds: float, now: float) -> None:
        if core_seconds <= 0 or not math.isfinite(core_seconds):
            return
        self._usage[account] = (self.usage(account, now) + core_seconds, now)

    def average(self, account: str, now: float) -> float:
        """Recent average cores in use (the decayed usage over the decay's time constant)."""
        return self.usage(account, now) * math.log(2) / self.half_life_s

    def key(self, account: str, cores_now: float, weight: float, now: float) -> float:
        return (cores_now + self.average(account, now)) / weight

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "half_life_s": self.half_life_s,
            "usage": {a: self.usage(a, now) for a in self._usage},
            "at": now,
        }

    def load(self, data: dict[str, Any]) -> None:
        at = float(data.get("at", 0.0))
        for account, value in dict(data.get("usage", {})).items():
            self._usage[str(account)] = (float(value), at)


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1.0 when all equal, 1/n when one gets everything."""
    if not xs or not any(xs):
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
