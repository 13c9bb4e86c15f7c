"""The ledger's waiting room side: admission into it, just-in-time release, priorities. Pure.

Admitted tasks wait in :class:`fleet.policy.room.Room`; :meth:`Dispatching.release` moves them
into the work queue while a queue's runway (tasks dispatched or running) is below its workers'
slots plus a small headroom, asking the room which task comes next each time. So the choice is
made when a slot frees, with everything known; nothing waits in JetStream but that short runway.
The ledger (``fleet.core.ledger``) calls :meth:`_enqueue` wherever a task must wait again
(a retry that is due, a requeue, an operator's retry).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from broker import names
from fleet.core.effects import Dispatch, Effect
from fleet.core.jobs import JobStats
from fleet.core.records import PrioritizeRequest, TaskEnvelope
from fleet.core.states import ACTIVE, TERMINAL, WAITING, TaskState
from fleet.core.tasks import Shape, TaskEntry
from fleet.policy.config import Policy
from fleet.policy.gate import DEFAULT_PROJECT, Gate
from fleet.policy.resources import needs_placement
from fleet.policy.room import Place, Room

ENVELOPE_CACHE = 20_000
"""Waiting tasks whose envelopes stay in memory (about 1 KB each)."""


class Rate:
    """Events per second over about the last two seconds (1-s buckets)."""

    __slots__ = ("count", "last", "second")

    def __init__(self) -> None:
        self.second, self.count, self.last = 0, 0, 0.0

    def add(self, now: float) -> None:
        sec = int(now)
        if sec != self.second:
            self.last = self.count if sec == self.second + 1 else 0.0
            self.second, self.count = sec, 0
        self.count += 1

    def rate(self, now: float) -> float:
        sec = int(now)
        if sec == self.second:
            return max(self.last, self.count / max(now - sec, 0.25))
        return self.count if sec == self.second + 1 else 0.0


class Dispatching:
    """State and methods the ledger shares with its waiting room (a base class of ``Ledger``)."""

    jobs: dict[str, JobStats]

    def __init__(self) -> None:
        self.policy = Policy()
        self.gate = Gate(self.policy)
        self.room = Room(self.policy)
        self.active_by_queue: dict[str, int] = {}
        self.rates: dict[str, Rate] = {}
        self._fresh: dict[int, TaskEnvelope] = {}
        """Envelopes of the first ``ENVELOPE_CACHE`` waiting tasks, dispatched without a re-read
        from the task store (the rest are read back when their turn comes)."""

    # hooks the ledger implements
    def job(self, job_id: str, now: float) -> JobStats:
        raise NotImplementedError

    def _move(
        self, entry: TaskEntry, dst: TaskState, now: float, reason: str | None = None, *, reopen: bool = False
    ) -> bool:
        raise NotImplementedError

    def _touch(self, entry: TaskEntry, job: JobStats, now: float) -> None:
        raise NotImplementedError

    def _touch_job(self, job: JobStats, now: float) -> None:
        raise NotImplementedError

    # -- where a job's tasks wait --------------------------------------------------------------------
    def place(self, job: JobStats, queue: str) -> Place:
        return Place(
            queue, self.policy.qos_of(job.qos, job.tenant), job.tenant, job.project or DEFAULT_PROJECT
        )

    def band(self, job: JobStats, priority: int) -> int:
        return job.priority if job.priority is not None else priority

    def _account(
        self, entry: TaskEntry, src: TaskState | None, dst: TaskState, job: JobStats, now: float
    ) -> None:
        """Keep quota and runway counters in step with one state change (called by ``_move``)."""
        if (src in ACTIVE) != (dst in ACTIVE):
            delta = 1 if dst in ACTIVE else -1
            if src == TaskState.RUNNING:
                self._finished(entry.queue, now)
            self.gate.active(job.tenant, job.project or DEFAULT_PROJECT, entry.shape, delta)
            self.active_by_queue[entry.queue] = self.active_by_queue.get(entry.queue, 0) + delta
            if delta < 0 and entry.placed is not None:
                self.gate.placement.hold(entry.placed, entry.shape.resources, -1)
                entry.placed = None
            elif delta > 0 and entry.placed is not None and src is None:  # restored from a record
                self.gate.placement.hold(entry.placed, entry.shape.resources, +1)
        if (src in WAITING) != (dst in WAITING):
            self.gate.pending(job.tenant, 1 if dst in WAITING else -1)
        if dst in TERMINAL and entry.intake_seq is not None:
            self._fresh.pop(entry.intake_seq, None)

    def configure(self, policy: Policy, now: float) -> None:
        """A new policy while running: limits and weights apply at the next pick; jobs whose QoS
        class no longer exists move to their tenant's default class."""
        self.policy = policy
        self.gate.configure(policy, now)
        self.room.policy = policy
        for job_id in list(self.room.jobs):
            job = self.jobs.get(job_id)
            if job is not None and any(p != self.place(job, p.queue) for p, _ in self.room.places(job_id)):
                self._rehome(job, now)

    # -- into the room --------------------------------------------------------------------------------
    def _wait_new(self, job: JobStats, env: TaskEnvelope, seq: int, shape: Shape, now: float) -> None:
        """A new task waits as an item of its job's lane (no entry of its own)."""
        place = self.place(job, env.queue)
        self.room.push_new(place, job.job_id, env.task_id, seq, shape, self.band(job, env.priority), now)
        job.submitted += 1
        job.count(None, TaskState.QUEUED)
        self.gate.pending(job.tenant, +1)
        if len(self._fresh) < ENVELOPE_CACHE:
            self._fresh[seq] = env

    def _enqueue(self, entry: TaskEntry, now: float, reason: str | None = None) -> list[Effect]:
        """The task waits (again) in the room, ahead of new tasks of its band."""
        if entry.state != TaskState.QUEUED and not self._move(
            entry, TaskState.QUEUED, now, reason if reason is not None else entry.reason
        ):
            return []
        if not entry.waiting:
            job = self.job(entry.job_id, now)
            entry.waiting = True
            self.room.push_entry(self.place(job, entry.queue), entry, now)
        return []

    def _leave_room(self, entry: TaskEntry, job: JobStats, now: float) -> None:
        if entry.waiting:
            entry.waiting = False
            self.room.remove_entry(self.place(job, entry.queue), entry, now)

    # -- out of the room -----------------------------------------------------------------------------
    def headroom(self, queue: str, slots: int, now: float) -> int:
        r = self.policy.runway
        rate = self.rates.get(queue)
        ahead = min(10 * slots, math.ceil(rate.rate(now) * r.ahead_s)) if rate is not None else 0
        return max(r.min_headroom, math.ceil(slots * r.headroom), ahead)

    def _finished(self, queue: str, now: float) -> None:
        """One more attempt of ``queue`` ended (the finish rate sizes the headroom)."""
        rate = self.rates.get(queue)
        if rate is None:
            rate = self.rates[queue] = Rate()
        rate.add(now)

    def release(self, now: float, slots: Mapping[str, int]) -> list[Effect]:
        """Dispatch what should run next on every queue, up to its free slots plus headroom."""
        out: list[Effect] = []
        for queue in list(self.room.queues):
            cap = slots.get(queue, 0)
            if cap <= 0 or not self.room.waiting(queue):
                continue
            want = cap + self.headroom(queue, cap, now) - self.active_by_queue.get(queue, 0)
            while want > 0:
                got = self.room.pick(queue, now, self.gate)
                if got is None:
                    break
                self.gate.take(got.shape, now)
                placed = self._place(queue, got.shape)
                entry = got.entry
                if entry is None:
                    job = self.job(got.job_id, now)
                    env = self._fresh.get(got.seq) if got.seq is not None else None
                    entry = self._entry(job, got.task_id, got.seq, queue, got.shape, got.priority)
                    if env is not None and env.payload.ref:
                        entry.blobs = (names.blob_name(got.job_id, env.payload.ref),)
                entry.waiting = False
                entry.placed = placed
                out += self._send(entry, now)
                want -= 1
        return out

    def _send(self, entry: TaskEntry, now: float) -> list[Effect]:
        """DISPATCHED, on its way to the work queue as a new message (a new fencing base)."""
        if not self._move(entry, TaskState.DISPATCHED, now, entry.reason):  # why it (re)runs
            return []
        entry.dispatch += 1
        entry.pending, entry.token = True, None
        env = self._fresh.pop(entry.intake_seq, None) if entry.intake_seq is not None else None
        queue = names.placed_queue(entry.placed) if entry.placed else entry.queue
        return [
            Dispatch(entry.job_id, entry.task_id, queue, entry.attempt, entry.dispatch, entry.intake_seq, env)
        ]

    def _place(self, queue: str, shape: Shape) -> str | None:
        """The worker a task asking for resources goes to (they are held until it ends)."""
        if not needs_placement(shape.resources):
            return None
        worker = self.gate.placement.choose(queue, shape.resources)
        if worker is not None:
            self.gate.placement.hold(worker, shape.resources, +1)
        return worker

    # -- changing the order ----------------------------------------------------------------------------
    def prioritize(self, req: PrioritizeRequest, now: float) -> list[Effect]:
        job = self.jobs.get(req.job_id)
        if job is None or job.finished_at is not None:
            return []
        if req.task_ids is None:
            if req.priority is not None:
                job.priority = req.priority
            if req.qos is not None:
                job.qos = req.qos
            self._rehome(job, now)
        else:
            for task_id in req.task_ids:
                self._prioritize_task(job, task_id, req, now)
        self._touch_job(job, now)
        return []

    def _prioritize_task(self, job: JobStats, task_id: str, req: PrioritizeRequest, now: float) -> None:
        entry = job.tasks.get(task_id)
        if entry is None:
            entry = self._take_new(job, task_id, now)
            if entry is None:
                return
        elif entry.waiting:
            self._leave_room(entry, job, now)
        if req.priority is not None:
            entry.priority = req.priority
        if entry.state == TaskState.QUEUED:
            self._enqueue(entry, now)
        self._touch(entry, job, now)

    def _take_new(self, job: JobStats, task_id: str, now: float) -> TaskEntry | None:
        """A new task out of its lane, as an entry of its own (still QUEUED, not in the room)."""
        got = self.room.remove_new(job.job_id, task_id, now)
        if got is None:
            return None
        seq, place, band, shape = got
        return self._entry(job, task_id, seq, place.queue, shape, band)

    @staticmethod
    def _entry(
        job: JobStats, task_id: str, seq: int | None, queue: str, shape: Shape, band: int
    ) -> TaskEntry:
        """A new task out of its lane gets an entry of its own (still QUEUED, counted already)."""
        entry = job.tasks[task_id] = TaskEntry(
            job_id=job.job_id,
            task_id=task_id,
            state=TaskState.QUEUED,
            queue=queue,
            shape=shape,
            priority=band,
            intake_seq=seq,
        )
        return entry

    def _rehome(self, job: JobStats, now: float) -> None:
        """Put all of a job's waiting tasks where its current class, project and priority say."""
        jr = self.room.jobs.get(job.job_id)
        if jr is None:
            return
        lane_items = [
            (place, band, lane.shape, list(lane.items())) for (place, band, _), lane in jr.lanes.items()
        ]
        _, entries = self.room.drop_job(job.job_id, now)
        for place, band, shape, items in lane_items:
            new_place = self.place(job, place.queue)
            new_band = job.priority if job.priority is not None else band
            for task_id, seq in items:
                self.room.push_new(new_place, job.job_id, task_id, seq, shape, new_band, now)
        for entry in entries:
            if job.priority is not None:
                entry.priority = job.priority
            self.room.push_entry(self.place(job, entry.queue), entry, now)

    # -- why tasks wait ----------------------------------------------------------------------------------
    def explain(self, now: float, slots: Mapping[str, int]) -> None:
        """Set each job's ``waiting`` reason (marking changed jobs dirty)."""
        for job_id in list(self.room.jobs):
            job = self.jobs.get(job_id)
            if job is not None:
                self._set_waiting(job, self._why(job, now, slots), now)
        for job in self.jobs.values():
            if job.waiting is not None and job.job_id not in self.room.jobs:
                self._set_waiting(job, None, now)

    def _set_waiting(self, job: JobStats, reason: str | None, now: float) -> None:
        if job.waiting != reason:
            job.waiting = reason
            self._touch_job(job, now)

    def _why(self, job: JobStats, now: float, slots: Mapping[str, int]) -> str:
        places: list[tuple[Place, Shape | None]] = list(self.room.places(job.job_id))
        place, shape = places[0] if places else (self.place(job, job.queue), None)
        if slots.get(place.queue, 0) <= 0:
            return f"no workers for queue {place.queue}"
        blocked = self.gate.tenant_block(place.tenant, now)
        if blocked is not None:
            return blocked
        if shape is not None and (why := self.gate.shape_block(shape, place.queue, now)) is not None:
            return why
        return "priority" if self._behind(place) else "waiting for a free slot"

    def _behind(self, place: Place) -> bool:
        """Does other waiting work of the queue come first by class, share or band?"""
        qnode = self.room.queues.get(place.queue)
        if qnode is None:
            return False
        order = self.room._class_order(qnode, 0.0)
        if order and order[0] != place.qos:
            return True
        cnode = qnode.kids.get(place.qos)
        return cnode is not None and sum(1 for k in cnode.kids.values() if k.n) > 1


__all__ = ["Dispatching"]
