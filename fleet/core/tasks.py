"""One task as the scheduler tracks it, and its state of record. Pure."""

from __future__ import annotations

import dataclasses

from fleet.core.failures import Counters, FailureClass
from fleet.core.records import DEFAULT_PRIORITY, Resources, RetryPolicy, TaskEnvelope, TaskRecord
from fleet.core.states import TaskState

DEFAULT_RETRY = RetryPolicy()
DEFAULT_RESOURCES = Resources()


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """What the scheduler needs to know of a task besides its identity: its retry budgets, the
    resources it asks for and the rate-limit tokens it takes. Interned: a million tasks of a sweep
    share one."""

    retry: RetryPolicy = DEFAULT_RETRY
    resources: Resources = DEFAULT_RESOURCES
    limits: tuple[tuple[str, float], ...] = ()

    def billing(self, gpu_weight: float) -> float:
        """Cores this task counts for in fair share (a GPU counts ``gpu_weight`` cores)."""
        return self.resources.cpus + gpu_weight * self.resources.gpus


DEFAULT_SHAPE = Shape()
_SHAPES: dict[Shape, Shape] = {DEFAULT_SHAPE: DEFAULT_SHAPE}


def intern_shape(
    retry: RetryPolicy | None = None,
    resources: Resources | None = None,
    limits: dict[str, float] | None = None,
) -> Shape:
    shape = Shape(
        retry or DEFAULT_RETRY, resources or DEFAULT_RESOURCES, tuple(sorted((limits or {}).items()))
    )
    return _SHAPES.setdefault(shape, shape)


_BY_FIELDS: dict[tuple[object, ...], Shape] = {}


def shape_of(env: TaskEnvelope) -> Shape:
    """The interned shape of an envelope (looked up by field values: hashing the pydantic models
    themselves costs more than the rest of an admission)."""
    res = env.resources
    key = (
        tuple(env.retry.__dict__.values()),
        res.cpus,
        res.gpus,
        res.memory_mb,
        tuple(res.labels.items()),
        tuple(env.limits.items()),
    )
    shape = _BY_FIELDS.get(key)
    if shape is None:
        if len(_BY_FIELDS) > 100_000:
            _BY_FIELDS.clear()
        shape = _BY_FIELDS[key] = intern_shape(env.retry, env.resources, env.limits)
    return shape


@dataclasses.dataclass(slots=True)
class TaskEntry:
    job_id: str
    task_id: str
    state: TaskState | None = None
    queue: str = "default"
    shape: Shape = DEFAULT_SHAPE
    priority: int = DEFAULT_PRIORITY
    counters: Counters = dataclasses.field(default_factory=Counters)
    dispatch: int = 0
    pending: bool = False
    """A dispatch is on its way: its stream sequence is not known yet (``seq`` is the previous one)."""
    seq: int | None = None
    token: int | None = None
    worker: str | None = None
    reason: str | None = None
    failure: FailureClass | None = None
    not_before: float | None = None
    intake_seq: int | None = None
    blobs: tuple[str, ...] = ()
    rev: int = 0
    waiting: bool = False
    """In the waiting room (``fleet.policy.room``) as itself."""
    placed: str | None = None
    """The worker this dispatch was placed on (a task asking for resources), holding them."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.task_id)

    @property
    def attempt(self) -> int:
        return self.counters.attempt

    @property
    def retry(self) -> RetryPolicy:
        return self.shape.retry

    def record(self, now: float) -> TaskRecord:
        """The next revision of this task's state of record."""
        assert self.state is not None
        self.rev += 1
        c = self.counters
        return TaskRecord(
            job_id=self.job_id,
            task_id=self.task_id,
            state=self.state,
            rev=self.rev,
            at=now,
            queue=self.queue,
            attempt=c.attempt,
            dispatch=self.dispatch,
            seq=self.seq,
            token=self.token,
            worker_id=self.worker,
            reason=self.reason,
            failure=self.failure,
            lost=c.lost,
            infra=c.infra,
            preempted=c.preempted,
            not_before=self.not_before,
            intake_seq=self.intake_seq,
            blobs=list(self.blobs),
            retry=None if self.shape.retry == DEFAULT_RETRY else self.shape.retry,
            resources=None if self.shape.resources == DEFAULT_RESOURCES else self.shape.resources,
            limits=dict(self.shape.limits),
            priority=self.priority,
            placed=self.placed,
        )

    @classmethod
    def from_record(cls, r: TaskRecord) -> TaskEntry:
        return cls(
            job_id=r.job_id,
            task_id=r.task_id,
            state=r.state,
            queue=r.queue,
            shape=intern_shape(r.retry, r.resources, r.limits),
            priority=r.priority,
            placed=r.placed,
            counters=Counters(attempt=r.attempt, lost=r.lost, infra=r.infra, preempted=r.preempted),
            dispatch=r.dispatch,
            seq=r.seq,
            token=r.token,
            worker=r.worker_id,
            reason=r.reason,
            failure=r.failure,
            not_before=r.not_before,
            intake_seq=r.intake_seq,
            blobs=tuple(r.blobs),
            rev=r.rev,
        )
