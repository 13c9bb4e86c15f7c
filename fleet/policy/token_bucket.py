"""Named token buckets (placeholder until the full module lands; same API)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from fleet.policy.config import LimiterPolicy


class Bucket:
    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity, self.tokens, self.at = rate, capacity, capacity, now
        self.paused_until = 0.0
        self.factor = 1.0

    def effective_rate(self, now: float) -> float:
        return self.rate * self.factor

    def level(self, now: float) -> float:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.effective_rate(now))
            self.at = now
        return self.tokens

    def wait_for(self, n: float, now: float) -> float:
        if n > self.capacity:
            return math.inf
        if now < self.paused_until:
            return self.paused_until - now
        lack = n - self.level(now)
        return 0.0 if lack <= 1e-9 else lack / self.effective_rate(now)

    def take(self, n: float, now: float) -> bool:
        if self.wait_for(n, now) > 0:
            return False
        self.tokens -= n
        return True

    def grant(self, want: float, now: float, holders: int, lease_s: float) -> float:
        if now < self.paused_until:
            return 0.0
        share = max(1.0, self.effective_rate(now) * lease_s / max(holders, 1))
        got = min(want, share, self.level(now))
        if got < min(want, 1.0):
            return 0.0
        self.tokens -= got
        return got

    def throttled(self, now: float, retry_after: float | None) -> None:
        self.level(now)
        self.factor = max(0.01, self.factor / 2)
        if retry_after:
            self.paused_until = now + retry_after


class Limiters:
    def __init__(self) -> None:
        self.buckets: dict[str, Bucket] = {}

    def configure(self, policies: Mapping[str, LimiterPolicy], now: float) -> None:
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
