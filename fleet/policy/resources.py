"""Resource matching: which worker a task that asks for resources goes to. Pure.

Workers declare what they have (cpus, gpus, memory, labels such as ``gpu: a100``) in their
heartbeats. A task that asks for more than a plain slot (GPUs, memory, labels, or more than one
CPU) is *placed*: the scheduler picks a live worker of its queue with enough free resources (the
best fit: the least left over) and dispatches to that worker alone, holding the resources until
the task ends, so a GPU is never booked twice. A plain task goes to the queue's shared runway, as
before. A request no worker of the queue could ever satisfy is refused at admission, naming the
largest worker; one that only has to wait says so (``resources gpus=2 (queue gpu)``).
"""

from __future__ import annotations

import dataclasses

from fleet.core.records import Resources

PLAIN = Resources()


def needs_placement(res: Resources) -> bool:
    return res.gpus > 0 or res.memory_mb > 0 or bool(res.labels) or res.cpus > 1


def describe(res: Resources) -> str:
    parts = [f"cpus={res.cpus:g}"] if res.cpus != 1 else []
    parts += [f"gpus={res.gpus}"] if res.gpus else []
    parts += [f"memory={res.memory_mb}MB"] if res.memory_mb else []
    parts += [f"{k}={v}" for k, v in sorted(res.labels.items())]
    return " ".join(parts) or "a slot"


@dataclasses.dataclass(slots=True)
class Machine:
    worker_id: str
    queue: str
    total: Resources

    def could_fit(self, res: Resources) -> bool:
        t = self.total
        return (
            res.cpus <= t.cpus
            and res.gpus <= t.gpus
            and res.memory_mb <= t.memory_mb
            and all(t.labels.get(k) == v for k, v in res.labels.items())
        )


@dataclasses.dataclass(slots=True)
class Used:
    cpus: float = 0.0
    gpus: int = 0
    memory_mb: int = 0


class Placement:
    def __init__(self) -> None:
        self.machines: dict[str, Machine] = {}
        self.used: dict[str, Used] = {}
        """What placed tasks hold, per worker (kept apart from the machines: a restarted
        scheduler counts them before the workers' first heartbeats)."""

    def sync(self, live: dict[str, tuple[str, Resources]]) -> None:
        """The live workers: id -> (queue, what it has)."""
        self.machines = {w: Machine(w, q, total) for w, (q, total) in live.items()}

    def fits(self, m: Machine, res: Resources) -> bool:
        u, t = self.used.get(m.worker_id) or Used(), m.total
        return (
            m.could_fit(res)
            and u.cpus + res.cpus <= t.cpus + 1e-9
            and u.gpus + res.gpus <= t.gpus
            and u.memory_mb + res.memory_mb <= t.memory_mb
        )

    def choose(self, queue: str, res: Resources) -> str | None:
        """The worker of ``queue`` that fits ``res`` with the least left over, or None."""
        best, best_left = None, (0, 0, 0.0)
        for m in self.machines.values():
            if m.queue != queue or not self.fits(m, res):
                continue
            u = self.used.get(m.worker_id) or Used()
            left = (m.total.gpus - u.gpus, m.total.memory_mb - u.memory_mb, m.total.cpus - u.cpus)
            if best is None or left < best_left:
                best, best_left = m.worker_id, left
        return best

    def hold(self, worker_id: str, res: Resources, delta: int) -> None:
        u = self.used.setdefault(worker_id, Used())
        u.cpus += delta * res.cpus
        u.gpus += delta * res.gpus
        u.memory_mb += delta * res.memory_mb
        if u.gpus <= 0 and u.memory_mb <= 0 and u.cpus <= 1e-9:
            del self.used[worker_id]

    def never_fits(self, queue: str, res: Resources) -> str | None:
        """Why no live worker of ``queue`` could ever run ``res``; None if one could, or if the
        queue has no live workers at all (one may still come)."""
        mine = [m for m in self.machines.values() if m.queue == queue]
        if not mine or any(m.could_fit(res) for m in mine):
            return None
        biggest = max(mine, key=lambda m: (m.total.gpus, m.total.memory_mb, m.total.cpus))
        return (
            f"needs {describe(res)}, more than any worker of queue {queue} has "
            f"(largest: {describe(biggest.total)})"
        )
