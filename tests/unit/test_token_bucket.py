"""Token buckets: never more than burst + rate x window over any window; leases; 429 back-off."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.policy.config import LimiterPolicy
from fleet.policy.token_bucket import Bucket, Limiters

T0 = 1_000.0

ops = st.lists(
    st.tuples(st.floats(0, 2.0), st.sampled_from(["take", "grant"]), st.floats(0.1, 30), st.integers(1, 8)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(0.5, 200), burst=st.floats(1, 100), seq=ops)
def test_granted_over_any_window_stays_within_burst_plus_rate(
    rate: float, burst: float, seq: list[tuple[float, str, float, int]]
) -> None:
    b = Bucket(rate, burst, T0)
    now, got = T0, []
    for dt, op, n, holders in seq:
        now += dt
        if op == "take":
            if b.take(n, now):
                got.append((now, n))
        else:
            g = b.grant(n, now, holders, 2.0)
            assert 0 <= g <= n
            if g:
                got.append((now, g))
        assert -1e-9 <= b.level(now) <= burst + 1e-9
    for i, (a, _) in enumerate(got):
        total = 0.0
        for t, n in got[i:]:
            total += n
            assert total <= burst + rate * (t - a) + 1e-6


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.5, 100), burst=st.floats(1, 50), n=st.floats(0.1, 50), spent=st.floats(0, 50))
def test_wait_for_is_exact(rate: float, burst: float, n: float, spent: float) -> None:
    b = Bucket(rate, burst, T0)
    b.take(min(spent, burst), T0)
    wait = b.wait_for(n, T0)
    if n > burst:
        assert wait == math.inf
        return
    assert b.take(n, T0 + wait + 1e-9)


def test_throttled_halves_the_rate_and_pauses() -> None:
    b = Bucket(100, 10, T0)
    b.take(10, T0)
    b.throttled(T0, retry_after=5.0)
    assert b.effective_rate(T0) == 50
    assert b.grant(5, T0 + 4.9, 1, 2.0) == 0 and b.wait_for(1, T0 + 4.9) > 0
    assert b.grant(5, T0 + 5.1, 1, 2.0) == 5


def test_reconfigure_keeps_levels_within_the_new_capacity() -> None:
    lim = Limiters()
    lim.configure({"a": LimiterPolicy(rate=10, burst=20), "b": LimiterPolicy(rate=1)}, T0)
    bucket = lim.get("a")
    assert bucket is not None and bucket.level(T0) == 20
    lim.configure({"a": LimiterPolicy(rate=5, burst=3)}, T0 + 1)
    assert lim.get("b") is None
    assert bucket.level(T0 + 1) == 3 and lim.get("a") is bucket


def test_the_rate_recovers_after_a_throttle() -> None:
    b = Bucket(100, 10, T0)
    b.throttled(T0, None)
    b.throttled(T0, None)
    assert b.effective_rate(T0) == 25
    assert b.effective_rate(T0 + 5) == 50  # +5 % of 100 a second
    assert b.effective_rate(T0 + 100) == 100


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1, 100), steps=st.lists(st.floats(0.05, 1.0), min_size=5, max_size=60))
def test_after_a_throttle_grants_stay_below_the_configured_rate(rate: float, steps: list[float]) -> None:
    b = Bucket(rate, rate, T0)
    b.take(rate, T0)  # empty
    b.throttled(T0, None)
    now, total = T0, 0.0
    for dt in steps:
        now += dt
        total += b.grant(1e6, now, 1, 2.0)
    assert total <= rate * (now - T0) + 1e-6  # strictly slower than the configured rate
