"""The waiting room: every admitted task that is not dispatched yet, and the choice of what runs
next. Pure: the ledger pushes tasks in and asks for the next one when a slot frees.

The room is a tree per queue::

    queue -> QoS class -> tenant -> project -> priority band (9..0) -> bucket

A pick walks down it: the class first (lowest rank, unless a class has gone ``max_wait`` without
a dispatch: then it is served first, its starvation bound), then the tenant with the smallest
fair-share key that is not held (quota, budget), then the project the same way, then the highest
band, and in the bucket the tasks that waited before (requeues and retries) ahead of new ones, then
jobs in order of arrival. A task whose rate limiter has no tokens is passed over for the next one.

A task that was never dispatched costs no object here: a job's new tasks of one shape wait in a
:class:`Lane`, two arrays and a list of ids (about 70 bytes a task). Tasks that ran before wait as
their :class:`~fleet.core.tasks.TaskEntry`. The cost of a pick grows with the number of classes,
tenants and projects that have waiting work, never with the number of waiting tasks.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from fleet.core.tasks import Shape, TaskEntry
from fleet.policy.config import Policy

BANDS = 10


class Judge(Protocol):
    """The policies a pick consults (``fleet.policy.gate.Gate``)."""

    def tenant_block(self, tenant: str, now: float) -> str | None:
        """Why ``tenant`` may not start anything now (quota, budget), or None."""

    def tenant_key(self, tenant: str, now: float) -> float:
        """Fair-share key among tenants: smallest first."""

    def project_key(self, tenant: str, project: str, now: float) -> float: ...

    def shape_block(self, shape: Shape, queue: str, now: float) -> str | None:
        """Why a task of this shape cannot start on ``queue`` now (no worker with the resources
        free, a limiter out of tokens), or None."""


class Lane:
    """New tasks of one job and one shape, in arrival order."""

    __slots__ = ("head", "ids", "job_id", "live", "seqs", "shape", "times", "top")

    def __init__(self, job_id: str, shape: Shape) -> None:
        self.job_id, self.shape = job_id, shape
        self.seqs = array("q")
        self.ids: list[str | None] = []
        self.times = array("d")
        self.head = self.live = self.top = 0

    def push(self, task_id: str, seq: int, at: float) -> None:
        self.seqs.append(seq)
        self.ids.append(task_id)
        self.times.append(at)
        self.live += 1
        self.top = max(self.top, seq)

    def pop(self) -> tuple[str, int, float] | None:
        while self.head < len(self.ids):
            i = self.head
            self.head += 1
            task_id = self.ids[i]
            if task_id is not None:
                self.live -= 1
                out = (task_id, self.seqs[i], self.times[i])
                self._compact()
                return out
        return None

    def remove(self, task_id: str) -> int | None:
        for i in range(self.head, len(self.ids)):
            if self.ids[i] == task_id:
                self.ids[i] = None
                self.live -= 1
                return self.seqs[i]
        return None

    def items(self) -> Iterator[tuple[str, int]]:
        for i in range(self.head, len(self.ids)):
            task_id = self.ids[i]
            if task_id is not None:
                yield task_id, self.seqs[i]

    def has(self, seq: int) -> bool:
        if seq > self.top:
            return False
        try:  # no copy of the array: search it, then check the hit is still waiting
            return self.seqs.index(seq, self.head) >= self.head
        except ValueError:
            return False

    def _compact(self) -> None:
        if self.head >= 4096 and self.head * 2 >= len(self.ids):
            del self.seqs[: self.head], self.ids[: self.head], self.times[: self.head]
            self.head = 0


@dataclasses.dataclass(slots=True)
class Bucket:
    again: deque[TaskEntry] = dataclasses.field(default_factory=deque)
    """Tasks that ran before (requeued, retry due, reopened): they go first."""
    lanes: deque[Lane] = dataclasses.field(default_factory=deque)
    n: int = 0


@dataclasses.dataclass(slots=True)
class Node:
    n: int = 0
    kids: dict[str, Node] = dataclasses.field(default_factory=dict)
    bands: list[Bucket] | None = None
    served: float = 0.0
    """When this class last got a dispatch (or began to wait): its starvation clock."""


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    """Where a job's tasks wait: everything above the band."""

    queue: str
    qos: str
    tenant: str
    project: str


@dataclasses.dataclass(slots=True)
class Picked:
    job_id: str
    task_id: str
    seq: int | None
    shape: Shape
    priority: int
    entry: TaskEntry | None
    """The task's entry if it ran before; None for a new task (the ledger creates one)."""


@dataclasses.dataclass(slots=True)
class JobRoom:
    """One job's waiting tasks: its lanes by (place, band, shape), and how many entries wait."""

    lanes: dict[tuple[Place, int, Shape], Lane] = dataclasses.field(default_factory=dict)
    entries: int = 0


class Room:
    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.queues: dict[str, Node] = {}
        self.jobs: dict[str, JobRoom] = {}

    # -- counting ---------------------------------------------------------------------------------
    def waiting(self, queue: str) -> int:
        node = self.queues.get(queue)
        return node.n if node is not None else 0

    def job_waiting(self, job_id: str) -> int:
        jr = self.jobs.get(job_id)
        return 0 if jr is None else jr.entries + sum(lane.live for lane in jr.lanes.values())

    def _path(self, place: Place, band: int, now: float) -> tuple[list[Node], Bucket]:
        q = self.queues.setdefault(place.queue, Node())
        c = q.kids.get(place.qos)
        if c is None:
            c = q.kids[place.qos] = Node(served=now)
        t = c.kids.setdefault(place.tenant, Node())
        p = t.kids.get(place.project)
        if p is None:
            p = t.kids[place.project] = Node(bands=[Bucket() for _ in range(BANDS)])
        assert p.bands is not None
        return [q, c, t, p], p.bands[band]

    def _count(self, place: Place, band: int, delta: int, now: float) -> Bucket:
        nodes, bucket = self._path(place, band, now)
        if delta > 0 and nodes[1].n == 0:
            nodes[1].served = now  # the class starts waiting: its starvation clock starts
        for node in nodes:
            node.n += delta
        bucket.n += delta
        return bucket

    # -- in ---------------------------------------------------------------------------------------
    def push_new(
        self, place: Place, job_id: str, task_id: str, seq: int, shape: Shape, band: int, now: float
    ) -> None:
        """A new task (never dispatched): appended to its job's lane, no object of its own."""
        jr = self.jobs.setdefault(job_id, JobRoom())
        lane = jr.lanes.get((place, band, shape))
        bucket = self._count(place, band, +1, now)
        if lane is None:  # lanes with nothing left are forgotten, so a known lane is in its bucket
            lane = jr.lanes[(place, band, shape)] = Lane(job_id, shape)
            bucket.lanes.append(lane)
        lane.push(task_id, seq, now)

    def push_entry(self, place: Place, entry: TaskEntry, now: float) -> None:
        """A task that ran before (requeued, retry due, reopened), ahead of new ones."""
        self.jobs.setdefault(entry.job_id, JobRoom()).entries += 1
        self._count(place, entry.priority, +1, now).again.append(entry)

    def contains(self, job_id: str, seq: int) -> bool:
        jr = self.jobs.get(job_id)
        return jr is not None and any(lane.has(seq) for lane in jr.lanes.values())

    # -- out --------------------------------------------------------------------------------------
    def remove_entry(self, place: Place, entry: TaskEntry, now: float) -> bool:
        _, bucket = self._path(place, entry.priority, now)
        try:
            bucket.again.remove(entry)
        except ValueError:
            return False
        self._count(place, entry.priority, -1, now)
        self._job_entries(entry.job_id, -1)
        return True

    def remove_new(self, job_id: str, task_id: str, now: float) -> tuple[int, Place, int, Shape] | None:
        """Take one new task out (a cancel or a new priority): its intake sequence and where it
        waited, or None if it is not waiting here."""
        jr = self.jobs.get(job_id)
        for (place, band, shape), lane in list(jr.lanes.items()) if jr else []:
            seq = lane.remove(task_id)
            if seq is not None:
                self._count(place, band, -1, now)
                self._forget_lane(job_id, place, band, lane)
                return seq, place, band, shape
        return None

    def drop_job(self, job_id: str, now: float) -> tuple[list[tuple[str, int]], list[TaskEntry]]:
        """Everything of a job (it was cancelled or re-keyed): its new tasks and its entries."""
        jr = self.jobs.pop(job_id, None)
        if jr is None:
            return [], []
        new: list[tuple[str, int]] = []
        entries: list[TaskEntry] = []
        for (place, band, _), lane in jr.lanes.items():
            items = list(lane.items())
            new += items
            if items:
                self._count(place, band, -len(items), now)
            _, bucket = self._path(place, band, now)
            if lane in bucket.lanes:
                bucket.lanes.remove(lane)
        if jr.entries:
            for q, qnode in self.queues.items():
                for c, cnode in qnode.kids.items():
                    for t, tnode in cnode.kids.items():
                        for p, pnode in tnode.kids.items():
                            for band, bucket in enumerate(pnode.bands or []):
                                mine = [e for e in bucket.again if e.job_id == job_id]
                                if mine:
                                    bucket.again = deque(e for e in bucket.again if e.job_id != job_id)
                                    self._count(Place(q, c, t, p), band, -len(mine), now)
                                    entries += mine
        return new, entries

    def pick(self, queue: str, now: float, judge: Judge) -> Picked | None:
        """The task that should take the next free slot of ``queue``, taken out; None if nothing
        waiting there may start now."""
        qnode = self.queues.get(queue)
        if qnode is None or qnode.n == 0:
            return None
        blocked: set[str] = set()
        for cls in self._class_order(qnode, now):
            cnode = qnode.kids[cls]
            while True:
                tenant = _smallest(
                    cnode, blocked, lambda t: judge.tenant_block(t, now), lambda t: judge.tenant_key(t, now)
                )
                if tenant is None:
                    break
                got = self._pick_tenant(Place(queue, cls, tenant, ""), cnode.kids[tenant], now, judge)
                if got is not None:
                    cnode.served = now
                    return got
                blocked.add(tenant)
        return None

    def _class_order(self, qnode: Node, now: float) -> list[str]:
        live = [c for c, node in qnode.kids.items() if node.n > 0]
        qos = self.policy.qos

        def starving(c: str) -> bool:
            bound = qos[c].max_wait if c in qos else None
            return bound is not None and now - qnode.kids[c].served >= bound

        first = sorted((c for c in live if starving(c)), key=lambda c: qnode.kids[c].served)
        rest = sorted((c for c in live if c not in first), key=lambda c: (qos[c].rank if c in qos else 99, c))
        return first + rest

    def _pick_tenant(self, place: Place, tnode: Node, now: float, judge: Judge) -> Picked | None:
        blocked: set[str] = set()
        while True:
            project = _smallest(
                tnode, blocked, lambda p: None, lambda p: judge.project_key(place.tenant, p, now)
            )
            if project is None:
                return None
            pnode = tnode.kids[project]
            assert pnode.bands is not None
            where = dataclasses.replace(place, project=project)
            for band in range(BANDS - 1, -1, -1):
                bucket = pnode.bands[band]
                if bucket.n and (got := self._take(where, band, bucket, now, judge)) is not None:
                    return got
            blocked.add(project)

    def _take(self, place: Place, band: int, bucket: Bucket, now: float, judge: Judge) -> Picked | None:
        if bucket.again and judge.shape_block(bucket.again[0].shape, place.queue, now) is None:
            entry = bucket.again.popleft()
            self._count(place, band, -1, now)
            self._job_entries(entry.job_id, -1)
            return Picked(entry.job_id, entry.task_id, entry.intake_seq, entry.shape, entry.priority, entry)
        while bucket.lanes and bucket.lanes[0].live == 0:
            bucket.lanes.popleft()
        for lane in bucket.lanes:
            if lane.live and judge.shape_block(lane.shape, place.queue, now) is None:
                item = lane.pop()
                assert item is not None
                self._count(place, band, -1, now)
                self._forget_lane(lane.job_id, place, band, lane)
                task_id, seq, _ = item
                return Picked(lane.job_id, task_id, seq, lane.shape, band, None)
        return None

    def _forget_lane(self, job_id: str, place: Place, band: int, lane: Lane) -> None:
        if lane.live:
            return
        jr = self.jobs.get(job_id)
        if jr is not None:
            jr.lanes.pop((place, band, lane.shape), None)
            if not jr.lanes and not jr.entries:
                del self.jobs[job_id]

    def _job_entries(self, job_id: str, delta: int) -> None:
        jr = self.jobs.get(job_id)
        if jr is not None:
            jr.entries += delta
            if not jr.lanes and jr.entries <= 0:
                del self.jobs[job_id]

    # -- explaining -------------------------------------------------------------------------------
    def places(self, job_id: str) -> Iterator[tuple[Place, Shape]]:
        jr = self.jobs.get(job_id)
        for place, _, shape in jr.lanes if jr else ():
            yield place, shape


def _smallest(
    node: Node, blocked: set[str], block: Callable[[str], str | None], key: Callable[[str], float]
) -> str | None:
    best, best_key = None, 0.0
    for name, kid in node.kids.items():
        if kid.n == 0 or name in blocked:
            continue
        if block(name) is not None:
            blocked.add(name)
            continue
        k = key(name)
        if best is None or k < best_key or (k == best_key and name < best):
            best, best_key = name, k
    return best
