"""Handlers the integration tests submit, referenced as ``handlers:<function>``.

``tests/`` is put on ``sys.path`` by ``tests/conftest.py`` (in-process workers) and on
``PYTHONPATH`` for worker subprocesses, so these import as the top-level module ``handlers``.
Slow handlers sleep in short steps and stop early when the task is cancelled, so a cancelled or
released task never keeps a thread busy for long.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from typing import Any

from fleet.worker.errors import Permanent

CALLS: collections.Counter[str] = collections.Counter()
"""How often :func:`counted` ran per key (in-process workers share this module)."""
_calls_lock = threading.Lock()


def square(x: int) -> int:
    return x * x


def _nap(seconds: float, ctx: Any) -> bool:
    """Sleep ``seconds`` in small steps; False if the task was cancelled meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ctx is not None and ctx.cancelled:
            return False
        time.sleep(min(0.02, max(0.0, end - time.monotonic())))
    return True


def slow(seconds: float, ctx: Any = None) -> float:
    _nap(seconds, ctx)
    return seconds


def slow_item(item: Any, seconds: float = 1.0, ctx: Any = None) -> Any:
    _nap(seconds, ctx)
    return item


def counted(key: str, seconds: float, ctx: Any = None) -> dict[str, Any]:
    """Count the call under ``key``, then take ``seconds``; returns who ran it and how often."""
    with _calls_lock:
        CALLS[key] += 1
    _nap(seconds, ctx)
    return {"key": key, "delivery": ctx.info.delivery if ctx is not None else None}


async def sleep_async(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def flaky_once(x: int, ctx: Any) -> int:
    """Fails on its first attempt (a transient error), succeeds on the next."""
    if ctx.attempt == 1:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return x * x


def permanent(x: Any) -> None:
    raise Permanent(f"input {x!r} can never work")


def chatty(item: int, ctx: Any) -> int:
    """Logs a line and reports progress through ``ctx``, then waits past one event flush."""
    ctx.log.info("hello from item %s", item)
    ctx.progress(0.5, f"half way through {item}")
    time.sleep(0.4)
    return item


def echo(data: Any) -> Any:
    return data


def digest(data: bytes) -> dict[str, Any]:
    return {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def unserializable() -> object:
    return object()


def always_fails(x: Any) -> None:
    raise RuntimeError(f"transient failure for {x!r}, every time")


def retry_at_infinity(x: Any, ctx: Any) -> None:
    """Asks for an infinite retry delay (the scheduler must cut it, not die)."""
    from fleet.worker.errors import Retry

    raise Retry("try again at the end of time", delay_s=float("inf"))


def rate_calls(limiter: str, seconds: float, ctx: Any = None) -> list[float]:
    """Call ``ctx.rate_limit(limiter)`` as fast as it lets us for ``seconds``; the call times."""
    assert ctx is not None
    calls: list[float] = []
    end = time.time() + seconds
    while time.time() < end:
        ctx.rate_limit(limiter, timeout=max(0.1, end - time.time()) + 5)
        calls.append(time.time())
    return calls


async def rate_calls_async(limiter: str, n: int, ctx: Any = None) -> int:
    for _ in range(n):
        await ctx.rate_limit(limiter)
    return n
