"""Progress and log events from running handlers, published in the background.

Handlers call ``ctx.progress`` and ``ctx.log`` from any thread; both only touch in-memory buffers
(thread-safe). A flusher on the event loop sends, every ``interval`` seconds, the latest progress
of each task and the log lines collected since the last flush, without waiting for acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from broker import names
from broker.publisher import Publisher
from fleet.core.records import TaskEnvelope, TaskEvent

MAX_LINES_PER_FLUSH = 200
MAX_LINE = 4000


class EventSink:
    def __init__(self, pub: Publisher, interval: float = 0.25) -> None:
        self.pub = pub
        self.interval = interval
        self._lock = threading.Lock()
        self._progress: dict[tuple[str, str, int], tuple[float, str | None]] = {}
        self._lines: list[tuple[str, str, int, str, str]] = []
        self._dropped = 0
        self._closed = asyncio.Event()

    def progress_cb(self, env: TaskEnvelope) -> Callable[[float, str | None], None]:
        key = (env.job_id, env.task_id, env.attempt)

        def progress(fraction: float, message: str | None) -> None:
            with self._lock:
                self._progress[key] = (fraction, message)

        return progress

    def log_cb(self, env: TaskEnvelope) -> Callable[[str, str], None]:
        def line(level: str, text: str) -> None:
            with self._lock:
                if len(self._lines) < MAX_LINES_PER_FLUSH * 10:
                    self._lines.append((env.job_id, env.task_id, env.attempt, level, text[:MAX_LINE]))
                else:
                    self._dropped += 1

        return line

    def close(self) -> None:
        self._closed.set()

    async def run(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.interval)
            await self.flush()

    async def flush(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, {}
            lines, self._lines = self._lines, []
        now = time.time()
        for (job, task, attempt), (fraction, message) in progress.items():
            ev = TaskEvent(
                kind="progress",
                job_id=job,
                task_id=task,
                at=now,
                attempt=attempt,
                progress=fraction,
                message=message,
            )
            await self.pub.fire(names.event_subject(job, task, names.EVENT_PROGRESS), ev.to_wire())
        for job, task, attempt, level, text in lines:
            ev = TaskEvent(
                kind="log", job_id=job, task_id=task, at=now, attempt=attempt, level=level, message=text
            )
            await self.pub.fire(names.event_subject(job, task, names.EVENT_LOG), ev.to_wire())
