"""Worker liveness from heartbeats: pure, driven by ``now``.

A worker is *lost* once ``missed`` heartbeat intervals pass without one from it. Its tasks'
JetStream leases (AckWait = a few intervals) lapse at about the same time, so the server
redelivers them; the scheduler uses this table to record the requeue and to show the fleet.
"""

from __future__ import annotations

import dataclasses

from fleet.core.records import Heartbeat


@dataclasses.dataclass
class WorkerView:
    worker_id: str
    queue: str
    host: str
    pid: int
    slots: int
    busy: int
    tasks: frozenset[str]
    last_seen: float
    interval_s: float
    stopping: bool = False


class WorkerTable:
    def __init__(self, missed: float = 3.0) -> None:
        self.missed = missed
        self.workers: dict[str, WorkerView] = {}

    def beat(self, hb: Heartbeat, now: float) -> None:
        self.workers[hb.worker_id] = WorkerView(
            worker_id=hb.worker_id,
            queue=hb.queue,
            host=hb.host,
            pid=hb.pid,
            slots=hb.slots,
            busy=hb.busy,
            tasks=frozenset(hb.tasks),
            last_seen=now,
            interval_s=hb.interval_s,
            stopping=hb.stopping,
        )

    def expire(self, now: float) -> list[WorkerView]:
        """Remove and return the workers whose heartbeats stopped."""
        lost = [w for w in self.workers.values() if now - w.last_seen > self.missed * w.interval_s]
        for w in lost:
            del self.workers[w.worker_id]
        return lost

    def alive(self) -> list[WorkerView]:
        return sorted(self.workers.values(), key=lambda w: w.worker_id)
