"""Worker liveness from heartbeats: pure, driven by a monotonic ``now``.

A worker is *lost* once ``missed`` heartbeat intervals pass without one from it (about 2.5 s with
the default 1 s heartbeat), whatever the task lease: the scheduler then requeues its tasks. Time
the scheduler itself could not listen (its loop stalled, its connection dropped) is not held
against workers: :meth:`WorkerTable.grace` moves every deadline on.
"""

from __future__ import annotations

import dataclasses

from fleet.core.records import Heartbeat, Resources


@dataclasses.dataclass
class WorkerView:
    worker_id: str
    queue: str = ""
    host: str = ""
    pid: int = 0
    slots: int = 0
    busy: int = 0
    held: int = 0
    last_seen: float = 0.0
    interval_s: float = 1.0
    stopping: bool = False
    resources: Resources | None = None


class WorkerTable:
    def __init__(self, missed: float = 2.5) -> None:
        self.missed = missed
        self.workers: dict[str, WorkerView] = {}

    def beat(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the worker was known (not new, not declared lost)."""
        known = hb.worker_id in self.workers
        self.workers[hb.worker_id] = WorkerView(
            worker_id=hb.worker_id,
            queue=hb.queue,
            host=hb.host,
            pid=hb.pid,
            slots=hb.slots,
            busy=hb.busy,
            held=len(hb.held),
            last_seen=now,
            interval_s=hb.interval_s,
            stopping=hb.stopping,
            resources=hb.resources,
        )
        return known

    def seed(self, worker_id: str, now: float, interval_s: float = 1.0) -> None:
        """A worker that held tasks before a restart: lost unless it beats within the deadline."""
        self.workers.setdefault(
            worker_id, WorkerView(worker_id=worker_id, last_seen=now, interval_s=interval_s)
        )

    def deadline(self, w: WorkerView) -> float:
        return w.last_seen + self.missed * w.interval_s

    def expire(self, now: float) -> list[WorkerView]:
        """Remove and return the workers whose heartbeats stopped."""
        lost = [w for w in self.workers.values() if now > self.deadline(w)]
        for w in lost:
            del self.workers[w.worker_id]
        return lost

    def grace(self, seconds: float) -> None:
        """The scheduler was deaf for ``seconds``: nobody is blamed for that time."""
        for w in self.workers.values():
            w.last_seen += seconds

    def refresh(self, now: float) -> None:
        """The scheduler's connection came back: every worker gets a full deadline from ``now``."""
        for w in self.workers.values():
            w.last_seen = max(w.last_seen, now)

    def alive(self) -> list[WorkerView]:
        return sorted(self.workers.values(), key=lambda w: w.worker_id)
