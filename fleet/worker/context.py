"""What a handler sees while it runs: ``ctx.task_id``, ``ctx.attempt``, ``ctx.log``, ``ctx.progress``.

A handler opts in by declaring a parameter named ``ctx``::

    def simulate(item, ctx):
        ctx.progress(0.5, "half way")
        ctx.log.info("seed %s", item)

``progress`` and ``log`` are safe to call from worker threads; they never block. Progress is
coalesced (only the latest value per flush is sent) and log lines go out as ``log`` events.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Immutable facts about the running attempt."""

    task_id: str
    job_id: str
    attempt: int
    delivery: int
    worker_id: str
    queue: str


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
    ) -> None:
        self.info = info
        self._on_progress = on_progress
        self._cancelled = threading.Event()
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
    def cancelled(self) -> bool:
        """True once the task was cancelled; long-running handlers should check it and return."""
        return self._cancelled.is_set()

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far along the task is (0.0-1.0) with an optional message."""
        self._on_progress(min(1.0, max(0.0, float(fraction))), message)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.log.handlers = []
        logging.Logger.manager.loggerDict.pop(self.log.name, None)
