"""Retry backoff: pure, with the random source injected."""

from __future__ import annotations

import random
from collections.abc import Callable

from fleet.core.records import RetryPolicy


def backoff_delay(policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after attempt ``attempt`` failed.

    Exponential (``backoff_s * multiplier ** (attempt - 1)``), capped at ``backoff_max_s``, then
    spread by +/- ``jitter`` (a fraction) so a failing dependency is not hit by a synchronized herd.
    """
    exponent = max(0, attempt - 1)
    try:
        base = min(policy.backoff_max_s, policy.backoff_s * policy.multiplier**exponent)
    except OverflowError:
        base = policy.backoff_max_s
    spread = base * policy.jitter * (2.0 * rand() - 1.0)
    return max(0.0, base + spread)


def should_retry(policy: RetryPolicy, attempt: int, retryable: bool) -> bool:
    return retryable and attempt < policy.max_attempts
