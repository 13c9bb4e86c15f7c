"""Progress and log events from running handlers, published in the background, best effort.

Handlers call ``ctx.progress`` and ``ctx.log`` from any thread; both only touch in-memory buffers
(thread-safe, bounded). A flusher on the event loop sends, every ``interval`` seconds, the latest
progress of each delivery and the log lines collected since the last flush with
:meth:`Publisher.fire`, which is bounded: when the bus is slow, events are dropped and counted,
never queued without limit. Each event carries the delivery's fencing token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from broker import names
from broker.publisher import Publisher
from fleet.core.records import TaskEvent

log = logging.getLogger("fleet.worker")

MAX_LINES_PER_FLUSH = 200
MAX_LINE = 4000


class Source(NamedTuple):
    job_id: str
    task_id: str
    attempt: int
    token: int


class EventSink:
    def __init__(self, pub: Publisher, interval: float = 0.25) -> None:
        self.pub = pub
        self.interval = interval
        self._lock = threading.Lock()
        self._progress: dict[Source, tuple[float, str | None]] = {}
        self._lines: list[tuple[Source, str, str]] = []
        self.dropped = 0
        """Events not sent: buffer full, or the publisher refused them (bus slow or down)."""
        self._closed = asyncio.Event()

    def progress_cb(self, src: Source) -> Callable[[float, str | None], None]:
        def progress(fraction: float, message: str | None) -> None:
            with self._lock:
                self._progress[src] = (fraction, message)

        return progress

    def log_cb(self, src: Source) -> Callable[[str, str], None]:
        def line(level: str, text: str) -> None:
            with self._lock:
                if len(self._lines) < MAX_LINES_PER_FLUSH * 10:
                    self._lines.append((src, level, text[:MAX_LINE]))
                else:
                    self.dropped += 1

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
        for src, (fraction, message) in progress.items():
            ev = TaskEvent(
                kind="progress",
                job_id=src.job_id,
                task_id=src.task_id,
                at=now,
                attempt=src.attempt,
                token=src.token,
                progress=fraction,
                message=message,
            )
            await self._fire(names.event_subject(src.job_id, src.task_id, names.EVENT_PROGRESS), ev)
        for src, level, text in lines:
            ev = TaskEvent(
                kind="log",
                job_id=src.job_id,
                task_id=src.task_id,
                at=now,
                attempt=src.attempt,
                token=src.token,
                level=level,
                message=text,
            )
            await self._fire(names.event_subject(src.job_id, src.task_id, names.EVENT_LOG), ev)

    async def _fire(self, subject: str, ev: TaskEvent) -> None:
        try:
            sent = await self.pub.fire(subject, ev.to_wire())
        except Exception as exc:  # an event is never worth failing a task or the worker for
            log.debug("event to %s not sent: %s", subject, exc)
            sent = False
        if not sent:
            self.dropped += 1
