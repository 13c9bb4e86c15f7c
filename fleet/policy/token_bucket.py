"""Global rate limiters: named token buckets the scheduler owns. Pure.

A bucket holds up to ``burst`` tokens and gains ``rate`` a second. Tokens are taken two ways: a
task that declares ``limits: {api-x: 1}`` pays at dispatch (:meth:`Bucket.take`), and workers'
handlers calling ``ctx.rate_limit("api-x")`` get short *leases* (:meth:`Bucket.grant`), a fair
slice of about one lease's worth of rate per active holder. Both draw on the same tokens, so over
any window the tokens handed out stay within ``burst + rate x window``.

When a handler reports an upstream refusal (HTTP 429, :meth:`Bucket.throttled`), the rate is
halved (down to 1 % of the configured one) and nothing is granted until ``retry_after``; it then
recovers additively, 5 % of the configured rate a second (AIMD).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fleet.policy.config import LimiterPolicy

RECOVERY_PER_S = 0.05
"""After a throttle, the rate comes back by this fraction of the configured rate each second."""
FLOOR = 0.01


class Bucket:
    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.at = capacity, now
        self.paused_until = 0.0
        self.factor, self.factor_at = 1.0, now

    def _factor(self, now: float) -> float:
        return min(1.0, self.factor + max(0.0, now - self.factor_at) * RECOVERY_PER_S)

    def effective_rate(self, now: float) -> float:
        return self.rate * self._factor(now)

    def level(self, now: float) -> float:
        if now > self.at:
            gain = (now - max(self.at, min(now, self.paused_until))) * self.effective_rate(now)
            self.tokens = min(self.capacity, self.tokens + max(0.0, gain))
            self.at = now
        return self.tokens

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now; inf: more than the bucket holds)."""
        if n > self.capacity + 1e-9:
            return math.inf
        pause = max(0.0, self.paused_until - now)
        lack = n - self.level(now)
        return pause + (0.0 if lack <= 1e-9 else lack / self.effective_rate(now))

    def take(self, n: float, now: float) -> bool:
        """All ``n`` tokens now, or none."""
        if self.wait_for(n, now) > 0:
            return False
        self.tokens -= n
        return True

    def grant(self, want: float, now: float, holders: int, lease_s: float) -> float:
        """A lease for a worker's handlers: up to ``want``, at most a fair slice of one lease's
        worth of rate among ``holders``, never more than is there; 0 if not even one token (or
        ``want``, if smaller) is there."""
        if now < self.paused_until:
            return 0.0
        share = max(1.0, self.effective_rate(now) * lease_s / max(holders, 1))
        got = min(want, share, self.level(now))
        if got < min(want, 1.0) - 1e-9:
            return 0.0
        self.tokens -= got
        return got

    def throttled(self, now: float, retry_after: float | None) -> None:
        self.level(now)
        self.factor, self.factor_at = max(FLOOR, self._factor(now) / 2), now
        if retry_after:
            self.paused_until = max(self.paused_until, now + retry_after)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "burst": self.capacity,
            "level": round(self.level(now), 3),
            "effective_rate": round(self.effective_rate(now), 3),
            "paused_until": self.paused_until if self.paused_until > now else None,
        }


class Limiters:
    def __init__(self) -> None:
        self.buckets: dict[str, Bucket] = {}

    def configure(self, policies: Mapping[str, LimiterPolicy], now: float) -> None:
        """A new policy: new limiters start full, removed ones go, changed ones keep their level
        (cut to the new burst)."""
        for name in list(self.buckets):
            if name not in policies:
                del self.buckets[name]
        for name, p in policies.items():
            b = self.buckets.get(name)
            if b is None:
                self.buckets[name] = Bucket(p.rate, p.capacity, now)
            else:
                b.level(now)
                b.rate, b.capacity = p.rate, p.capacity
                b.tokens = min(b.tokens, p.capacity)

    def get(self, name: str) -> Bucket | None:
        return self.buckets.get(name)

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        return {name: b.status(now) for name, b in sorted(self.buckets.items())}
