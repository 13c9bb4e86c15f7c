"""The deliveries a worker holds, keyed by fencing token, and the rules that keep it honest.

Shared by the worker's event loop (which registers a delivery the moment it is fetched and drops it
when it is finished) and the pulse thread (which lists the held deliveries in heartbeats, renews
their leases, applies the scheduler's fences and fences the worker itself). Every method takes the
lock; time comes in as ``now`` (``time.monotonic``), so the rules are tested with a fake clock:

* **self-fencing**: a delivery whose lease was last confirmed (``+WPI`` answered, or the fetch)
  more than ``0.8 x lease`` ago is *lost*: the worker stops it and neither acks nor reports success.
* **pauses**: if the pulse thread's ticks are more than ``2.5 x heartbeat`` apart (the process was
  stopped, or starved), every held delivery becomes *unconfirmed*: the scheduler may have given
  it away meanwhile. Its final report and ack wait for the next heartbeat reply, which fences it
  or confirms it. The worker loop also treats a pulse thread that has not ticked for that long as
  a pause in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from fleet.core.records import Fence, HeldTask

FENCE_AFTER = 0.8
"""Self-fence when a lease was last confirmed this fraction of the lease ago."""
GAP_FACTOR = 2.5
"""A pause is a gap between pulse ticks longer than this many heartbeat intervals."""


@dataclasses.dataclass(eq=False)
class Held:
    token: int
    job_id: str | None
    task_id: str | None
    reply: str
    """The message's ack subject (``$JS.ACK...``): ``+WPI`` and ``+ACK`` go there, from any connection."""
    last_ok: float
    """Monotonic time of the last confirmed lease renewal (the fetch, at first)."""
    confirmed: bool = True
    fenced: bool = False
    """The scheduler said stop: another delivery holds the task, or the task is over."""
    fence_ack: bool = False
    lost: bool = False
    """Self-fenced: the lease could not be renewed in time."""
    reason: str = ""

    @property
    def gone(self) -> bool:
        return self.fenced or self.lost

    def held_task(self) -> HeldTask | None:
        if self.job_id is None or self.task_id is None:
            return None
        return HeldTask(job_id=self.job_id, task_id=self.task_id, token=self.token)


class Commit(enum.Enum):
    GO = "go"
    """Report and ack."""
    WAIT = "wait"
    """Unconfirmed after a pause: wait for the next heartbeat reply."""
    GONE = "gone"
    """Fenced or lost: do not report success, do not ack."""


class Registry:
    def __init__(self, *, lease_s: float, interval_s: float, now: float | None = None) -> None:
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.fence_after = FENCE_AFTER * lease_s
        self.gap_s = GAP_FACTOR * interval_s
        self._lock = threading.Lock()
        self._held: dict[int, Held] = {}
        self.last_tick = time.monotonic() if now is None else now
        self.epoch = 0
        """Grows at every pause; a heartbeat reply confirms only deliveries of its own epoch."""
        self.gaps = 0

    # -- the worker loop ---------------------------------------------------------------------------
    def add(self, token: int, job_id: str | None, task_id: str | None, reply: str, now: float) -> Held:
        held = Held(token, job_id, task_id, reply, last_ok=now)
        with self._lock:
            self._held[token] = held
        return held

    def drop(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def __contains__(self, token: object) -> bool:
        with self._lock:
            return token in self._held

    def commit(self, held: Held, now: float) -> Commit:
        """May ``held``'s final report be published and its message acked now?"""
        with self._lock:
            if held.gone or held.token not in self._held:
                return Commit.GONE
            if not held.confirmed or now - self.last_tick > self.gap_s:
                return Commit.WAIT
            return Commit.GO

    def alive(self, held: Held, now: float) -> bool:
        """Is the lease still being renewed (so publishing for this delivery is worth it)?"""
        with self._lock:
            return not held.gone and held.token in self._held and now - held.last_ok <= self.fence_after

    # -- the pulse thread ---------------------------------------------------------------------------
    def tick(self, now: float) -> bool:
        """Record a pulse tick; True if a pause was seen (every held delivery is then unconfirmed)."""
        with self._lock:
            gap = now - self.last_tick > self.gap_s
            self.last_tick = max(self.last_tick, now)
            if gap:
                self.epoch += 1
                self.gaps += 1
                for h in self._held.values():
                    h.confirmed = False
            return gap

    def beat(self) -> tuple[int, list[HeldTask]]:
        """What the next heartbeat lists, and the epoch its reply confirms."""
        with self._lock:
            tasks = [t for h in self._held.values() if not h.gone and (t := h.held_task()) is not None]
            return self.epoch, tasks

    def apply_reply(self, epoch: int, sent: Iterable[int], fences: Iterable[Fence]) -> list[Held]:
        """Apply a heartbeat reply: mark and drop the fenced deliveries (returned), confirm the rest
        of those the heartbeat listed if no pause happened since it was sent."""
        out = []
        with self._lock:
            for f in fences:
                h = self._held.pop(f.token, None)
                if h is None or h.gone:
                    continue
                h.fenced, h.fence_ack, h.reason = True, f.ack, f.reason
                out.append(h)
            if epoch == self.epoch:
                for token in sent:
                    if (h := self._held.get(token)) is not None:
                        h.confirmed = True
        return out

    def renewable(self) -> list[Held]:
        with self._lock:
            return [h for h in self._held.values() if not h.gone]

    def renewed(self, held: Held, now: float) -> None:
        with self._lock:
            held.last_ok = max(held.last_ok, now)

    def expire(self, now: float) -> list[Held]:
        """Self-fence: mark lost and drop every delivery whose lease was not confirmed in time."""
        out = []
        with self._lock:
            for token, h in list(self._held.items()):
                if not h.gone and now - h.last_ok > self.fence_after:
                    h.lost = True
                    h.reason = (
                        f"lease not renewed for {now - h.last_ok:.1f}s "
                        f"(over {FENCE_AFTER:g} x the {self.lease_s:g}s lease): this worker fenced itself"
                    )
                    del self._held[token]
                    out.append(h)
        return out


class PublishWatch:
    """Outstanding acknowledged publishes (start and done reports), to tell a worker that cannot
    publish: one whose publisher got no PubAck for ``limit`` seconds while something waits to be
    stored stops renewing its leases, so its tasks go to workers that can report."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        key = next(self._ids)
        with self._lock:
            self._pending[key] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def oldest(self) -> float | None:
        with self._lock:
            return min(self._pending.values(), default=None)

    def stalled(self, now: float, last_ack: float, limit: float) -> bool:
        oldest = self.oldest()
        return oldest is not None and now - max(oldest, last_ack) > limit
