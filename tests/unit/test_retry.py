"""Retry backoff and the retry decision."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.core.records import RetryPolicy
from fleet.core.retry import backoff_delay, should_retry

FAST = settings(max_examples=80, deadline=None)


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the spread vanishes


def test_backoff_grows_exponentially() -> None:
    policy = RetryPolicy(backoff_s=1.0, multiplier=2.0, backoff_max_s=1000.0, jitter=0.5)
    assert [backoff_delay(policy, a, no_jitter) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    policy3 = RetryPolicy(backoff_s=0.5, multiplier=3.0, backoff_max_s=1000.0)
    assert [backoff_delay(policy3, a, no_jitter) for a in range(1, 5)] == [0.5, 1.5, 4.5, 13.5]


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(backoff_s=1.0, multiplier=2.0, backoff_max_s=10.0, jitter=0.0)
    assert [backoff_delay(policy, a, no_jitter) for a in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]
    assert backoff_delay(policy, 500, no_jitter) == 10.0


def test_constant_backoff_with_multiplier_one() -> None:
    policy = RetryPolicy(backoff_s=3.0, multiplier=1.0, jitter=0.0)
    assert {backoff_delay(policy, a) for a in range(1, 20)} == {3.0}


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempts_below_one_use_the_base_delay(attempt: int) -> None:
    policy = RetryPolicy(backoff_s=2.0, multiplier=5.0, jitter=0.0)
    assert backoff_delay(policy, attempt) == 2.0


def test_jitter_extremes() -> None:
    policy = RetryPolicy(backoff_s=10.0, multiplier=2.0, jitter=0.2)
    assert backoff_delay(policy, 1, lambda: 0.0) == pytest.approx(8.0)
    assert backoff_delay(policy, 1, lambda: 1.0) == pytest.approx(12.0)
    assert backoff_delay(policy, 2, lambda: 0.0) == pytest.approx(16.0)
    assert backoff_delay(policy, 2, lambda: 0.75) == pytest.approx(22.0)


def test_zero_jitter_ignores_random_source() -> None:
    policy = RetryPolicy(backoff_s=1.5, jitter=0.0)
    assert {backoff_delay(policy, 2, lambda: 0.0), backoff_delay(policy, 2, lambda: 0.99)} == {3.0}


def test_default_random_source_stays_in_bounds() -> None:
    policy = RetryPolicy(backoff_s=4.0, jitter=0.5)
    delays = [backoff_delay(policy, 1) for _ in range(200)]
    assert all(2.0 <= d <= 6.0 for d in delays)
    assert len(set(delays)) > 1, "jitter should spread delays"


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 20),
    backoff_s=st.floats(0, 100, allow_nan=False),
    backoff_max_s=st.floats(0, 1000, allow_nan=False),
    multiplier=st.floats(1, 10, allow_nan=False),
    jitter=st.floats(0, 1, allow_nan=False),
)


@FAST
@given(policies, st.integers(1, 60), st.floats(0, 1, exclude_max=True))
def test_jitter_bounds(policy: RetryPolicy, attempt: int, r: float) -> None:
    base = min(policy.backoff_max_s, policy.backoff_s * policy.multiplier ** (attempt - 1))
    delay = backoff_delay(policy, attempt, lambda: r)
    assert math.isfinite(delay)
    assert delay >= 0.0
    assert base * (1 - policy.jitter) - 1e-9 <= delay <= base * (1 + policy.jitter) + 1e-9
    assert delay <= policy.backoff_max_s * (1 + policy.jitter) + 1e-9


@FAST
@given(policies, st.integers(1, 60))
def test_backoff_without_jitter_is_monotonic(policy: RetryPolicy, attempt: int) -> None:
    assert backoff_delay(policy, attempt, no_jitter) <= backoff_delay(policy, attempt + 1, no_jitter)


def test_backoff_does_not_overflow() -> None:
    policy = RetryPolicy(max_attempts=1000, multiplier=100.0, backoff_s=1.0, backoff_max_s=60.0, jitter=0.0)
    assert backoff_delay(policy, 999) == 60.0  # 100**998 overflows a float


@pytest.mark.parametrize(
    ("max_attempts", "attempt", "retryable", "expected"),
    [
        (3, 1, True, True),
        (3, 2, True, True),
        (3, 3, True, False),
        (3, 4, True, False),
        (3, 1, False, False),
        (1, 1, True, False),
        (1000, 999, True, True),
        (1000, 1000, True, False),
    ],
)
def test_should_retry(max_attempts: int, attempt: int, retryable: bool, expected: bool) -> None:
    assert should_retry(RetryPolicy(max_attempts=max_attempts), attempt, retryable) is expected


@FAST
@given(st.integers(1, 1000), st.integers(1, 1100), st.booleans())
def test_should_retry_property(max_attempts: int, attempt: int, retryable: bool) -> None:
    assert should_retry(RetryPolicy(max_attempts=max_attempts), attempt, retryable) == (
        retryable and attempt < max_attempts
    )
