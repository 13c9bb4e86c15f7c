"""What a handler sees while it runs: ``ctx.task_id``, ``ctx.attempt``, ``ctx.token``, ``ctx.log``,
``ctx.progress``, ``ctx.cancelled`` and ``ctx.fenced``.

A handler opts in by declaring a parameter named ``ctx``::

    def simulate(item, ctx):
        ctx.progress(0.5, "half way")
        ctx.log.info("seed %s", item)

``progress`` and ``log`` are safe to call from worker threads; they never block. Progress is
coalesced (only the latest value per flush is sent) and log lines go out as ``log`` events; both
are best effort (dropped when the bus is slow).

``ctx.token`` is the fencing token of this delivery (:mod:`fleet.core.fencing`): a handler that writes
to an external store can pass it along so the store refuses writes from an older holder.
``ctx.confirm()`` asks the scheduler right now whether this delivery still holds the task (call it
just before an irreversible side effect). ``ctx.fenced`` becomes True when this worker is no longer the task's holder (the scheduler gave the
task to another worker, or this worker lost its lease); the outcome of a fenced run is discarded,
so a handler that sees it should stop at once. ``ctx.cancelled`` is True then too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fleet.worker.tokens import TokenPools


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Immutable facts about the running attempt."""

    task_id: str
    job_id: str
    attempt: int
    delivery: int
    worker_id: str
    queue: str
    token: int = 0
    """Fencing token of this delivery (grows with every dispatch and delivery of the task)."""


class _EventHandler(logging.Handler):
    def __init__(self, sink: Callable[[str, str], None]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink(record.levelname.lower(), self.format(record))
        except Exception:  # a logging call must never break the handler
            self.handleError(record)


class TaskContext:
    def __init__(
        self,
        info: TaskInfo,
        on_progress: Callable[[float, str | None], None],
        on_log: Callable[[str, str], None],
        confirm: Callable[[int, float], bool | None] | None = None,
        tokens: TokenPools | None = None,
    ) -> None:
        self.info = info
        self._confirm = confirm
        self._tokens = tokens
        self._on_progress = on_progress
        self._cancelled = threading.Event()
        self._fenced = threading.Event()
        logger = logging.getLogger(f"fleet.task.{info.job_id}.{info.task_id}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.handlers = [_EventHandler(on_log)]
        self.log = logger

    @property
    def task_id(self) -> str:
        return self.info.task_id

    @property
    def job_id(self) -> str:
        return self.info.job_id

    @property
    def attempt(self) -> int:
        return self.info.attempt

    @property
    def token(self) -> int:
        return self.info.token

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled; long-running handlers should check it and return."""
        return self._cancelled.is_set()

    @property
    def fenced(self) -> bool:
        """True once this delivery is no longer the task's holder: its outcome will be discarded."""
        return self._fenced.is_set()

    def confirm(self, timeout: float = 30.0) -> bool:
        """Ask the scheduler, now, whether this delivery still holds its task: True only if it does.

        Call it right before an irreversible side effect (and pass ``ctx.token`` to the store too):
        the scheduler confirms exactly one delivery of a task at a time, even when JetStream hands
        out the same delivery twice after a server crash. While the scheduler does not answer (it
        is restarting) it asks again, for up to ``timeout`` seconds, then gives False. It blocks the
        calling thread; in an ``async def`` handler use ``await asyncio.to_thread(ctx.confirm)``."""
        deadline = time.monotonic() + timeout
        while self._confirm is not None and not self.fenced:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            answer = self._confirm(self.info.token, min(left, 2.0))
            if answer is not None:
                return answer and not self.fenced
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return False

    def rate_limit(self, limiter: str, n: float = 1.0, timeout: float | None = None) -> Any:
        """Wait for ``n`` tokens of the fleet-wide rate limiter ``limiter`` (``fleet limit``).

        In a plain function it blocks and returns None; in an ``async def`` handler it returns an
        awaitable: ``await ctx.rate_limit("api-x")``. Tokens come in short leases from the
        scheduler, so all workers together stay within the limiter's rate. ``timeout`` (seconds)
        raises :class:`fleet.worker.tokens.RateLimitError` instead of waiting longer."""
        return self._maybe_async(self._pools().take, limiter, n, timeout)

    def throttled(self, limiter: str, retry_after: float | None = None) -> Any:
        """Tell the scheduler the upstream behind ``limiter`` refused a call (HTTP 429): it slows the
        limiter down for every worker (and pauses it for ``retry_after`` seconds if given)."""
        return self._maybe_async(self._pools().throttled, limiter, retry_after)

    def _pools(self) -> TokenPools:
        if self._tokens is None:
            raise RuntimeError("rate limits need a fleet worker (not available in this executor)")
        return self._tokens

    @staticmethod
    def _maybe_async(fn: Callable[..., None], *args: Any) -> Awaitable[None] | None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            fn(*args)
            return None
        return asyncio.to_thread(fn, *args)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far along the task is (0.0-1.0) with an optional message."""
        self._on_progress(min(1.0, max(0.0, float(fraction))), message)

    def cancel(self) -> None:
        self._cancelled.set()

    def fence(self) -> None:
        self._fenced.set()
        self._cancelled.set()

    def close(self) -> None:
        self.log.handlers = []
        logging.Logger.manager.loggerDict.pop(self.log.name, None)
