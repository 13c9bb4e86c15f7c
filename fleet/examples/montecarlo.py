"""Demo handlers: a Monte Carlo estimate of pi, one sample block per item.

``estimate(seed, samples)`` throws ``samples`` random points with its own seeded generator and
returns how many land inside the unit circle. Every 97th seed fails on its first attempt (a
simulated flaky node) so the demo shows retries.
"""

from __future__ import annotations

import random
import time
from typing import Any


class FlakyNode(RuntimeError):
    """A transient failure: the retry policy tries the task again."""


def estimate(seed: int, samples: int = 20_000, io_s: float = 0.02, ctx: Any = None) -> dict[str, int]:
    if ctx is not None and ctx.attempt == 1 and seed % 97 == 13:
        raise FlakyNode(f"simulated transient failure on seed {seed}")
    rng = random.Random(seed)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    time.sleep(io_s)  # stands for reading inputs / writing outputs
    return {"seed": seed, "inside": inside, "samples": samples}


def noop(*_: Any, **__: Any) -> None:
    """Does nothing (used by ``fleet bench``)."""
    return None


async def async_noop(*_: Any, **__: Any) -> None:
    return None
