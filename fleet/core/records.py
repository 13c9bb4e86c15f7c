"""Wire records: frozen, versioned pydantic models, encoded as one msgpack map each.

These are the shapes specified in ``clients/PROTOCOL.md``; nothing here holds a connection, a
lock or a callback (runtime handles live in the worker and scheduler). Unknown fields are ignored
so that newer clients can add optional fields; a wrong type or a missing required field is an
:class:`InvalidRecord` that names the field.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from broker import codec, names
from fleet.core.failures import FailureClass
from fleet.core.states import TERMINAL, TaskState

PROTOCOL_VERSION = 1
DEFAULT_PRIORITY = 5

MAX_DELAY_S = 7 * 24 * 3600.0
"""Longest retry delay a handler or a policy may ask for; longer requests are cut to this."""
MAX_TIMEOUT_S = 366 * 24 * 3600.0
"""Longest task timeout."""
LATEST_TIME = 7_258_118_400.0
"""2200-01-01: no timestamp from outside may be later (or infinite, or NaN)."""
_HANDLER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*")


class InvalidRecord(ValueError):
    """A message that decodes but does not match its record schema."""


def _token(v: str) -> str:
    return names.check_token(v, "identifier")


Token = Annotated[str, AfterValidator(_token)]


def _clamp_delay(v: object) -> object:
    """A delay from a handler is advice: out-of-range values are cut, never fatal."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return 0.0 if math.isnan(v) or v < 0 else min(float(v), MAX_DELAY_S)
    return v


Delay = Annotated[float, BeforeValidator(_clamp_delay)]
Time = Annotated[float, Field(ge=0, le=LATEST_TIME)]


class Record(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="ignore", strict=False, populate_by_name=True, allow_inf_nan=False
    )

    v: int = PROTOCOL_VERSION

    @model_validator(mode="after")
    def _version(self) -> Self:
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {self.v} (this build speaks {PROTOCOL_VERSION})")
        return self

    def to_wire(self) -> bytes:
        return codec.pack(self.model_dump(mode="python", exclude_none=True))

    @classmethod
    def from_wire(cls, data: bytes) -> Self:
        return parse(cls, codec.unpack(data))


R = TypeVar("R", bound=BaseModel)


def parse(cls: type[R], obj: dict[str, Any]) -> R:
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise InvalidRecord(describe(exc, cls.__name__)) from None


def describe(exc: ValidationError, what: str) -> str:
    """One line naming every bad field, e.g. ``TaskEnvelope: priority: Input should be ...``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return f"{what}: " + "; ".join(parts) + more


class Payload(BaseModel):
    """A user value (arguments or a result); see :mod:`broker.codec` for the encodings."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    enc: Literal["msgpack", "msgpack+zstd"] = "msgpack"
    size: int = Field(ge=0)
    data: Annotated[bytes, Strict()] | None = None
    ref: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.data is None) == (self.ref is None):
            raise ValueError("payload needs exactly one of data or ref")
        return self


class Resources(BaseModel):
    """What a task asks for, or what a worker has (``fleet.policy.resources``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)
    cpus: float = Field(default=1.0, ge=0, le=1e5)
    gpus: int = Field(default=0, ge=0, le=1024)
    memory_mb: int = Field(default=0, ge=0)
    labels: dict[str, str] = {}
    """A task: labels its worker must have (``{"gpu": "a100"}``); a worker: the labels it has."""

    def __hash__(self) -> int:
        return hash((self.cpus, self.gpus, self.memory_mb, tuple(sorted(self.labels.items()))))


class RetryPolicy(BaseModel):
    """Retry budgets, one per failure class (see fleet.core.failures), and the backoff between
    attempts (see fleet.core.retry)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)
    max_attempts: int = Field(default=3, ge=1, le=1000)
    """Attempts for application errors, timeouts and kills (the handler's own failures)."""
    max_lost_leases: int = Field(default=3, ge=1, le=1000)
    """Leases lost (worker died, hung or cut off) before the task is declared poison (dead)."""
    max_infra: int = Field(default=10, ge=1, le=1000)
    """Infrastructure failures (network, storage) tolerated before the task fails."""
    max_preemptions: int = Field(default=100, ge=1, le=100_000)
    backoff_s: float = Field(default=1.0, ge=0, le=MAX_DELAY_S)
    backoff_max_s: float = Field(default=300.0, ge=0, le=MAX_DELAY_S)
    multiplier: float = Field(default=2.0, ge=1.0, le=100.0)
    jitter: float = Field(default=0.1, ge=0, le=1)


class TaskEnvelope(Record):
    """One unit of work as it travels from client to scheduler to worker."""

    task_id: Token
    job_id: Token
    handler: str | None = None
    command: list[str] | None = None
    payload: Payload
    tenant: Token = "default"
    queue: Token = "default"
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)
    """0..9 within the tenant: 9 runs first, 5 is the default (``fleet.policy.order``)."""
    qos: Token | None = None
    """QoS class (``urgent``, ``normal``, ``backfill`` or one the policy names); the job's or the
    tenant's default when absent."""
    project: Token | None = None
    """Fair-share account within the tenant; the job's when absent."""
    resources: Resources = Resources()
    limits: dict[Token, Annotated[float, Field(gt=0, le=1e6)]] = {}
    """Tokens this task takes from named rate limiters when it is dispatched (``{"api-x": 1}``)."""
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    idempotency_key: str | None = Field(default=None, max_length=256)
    created_at: Time
    attempt: int = Field(default=1, ge=1)
    not_before: Time | None = None
    """Do not start before this time (seconds since the epoch)."""
    labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _work(self) -> Self:
        if (self.handler is None) == (self.command is None):
            raise ValueError("exactly one of handler or command is required")
        if self.handler is not None and not _HANDLER.fullmatch(self.handler):
            raise ValueError(f"handler {self.handler!r} is not of the form 'package.module:function'")
        if self.command is not None and not self.command:
            raise ValueError("command must be a non-empty argv list")
        return self


class JobSpec(Record):
    """A job declaration: published before its tasks so the scheduler knows the total."""

    job_id: Token
    name: str = Field(default="", max_length=200)
    tenant: Token = "default"
    queue: Token = "default"
    total: int | None = Field(default=None, ge=0)
    created_at: Time
    labels: dict[str, str] = {}
    qos: Token | None = None
    """The job's QoS class; the tenant's default when absent."""
    project: Token | None = None
    """The job's fair-share account within its tenant (``default`` when absent)."""


class CancelRequest(Record):
    """Cancel a whole job, or one task of it. Stored until the job is archived, so it sticks."""

    job_id: Token
    task_id: Token | None = None
    reason: str = Field(default="cancelled by user", max_length=1000)
    at: Time


class RetryRequest(Record):
    """Run a job's failed tasks again (``fleet retry``), optionally only some failure classes."""

    job_id: Token
    request_id: Token
    failures: list[FailureClass] | None = None
    """Only tasks whose last failure is of one of these classes (all classes when absent)."""
    include_dead: bool = False
    task_ids: list[Token] | None = None
    """Only these tasks (``fleet dlq replay``)."""
    at: Time


class PrioritizeRequest(Record):
    """Change the priority (and optionally the QoS class) of a job's waiting tasks
    (``fleet prioritize``); later submissions of the job get it too unless ``task_ids`` is given."""

    job_id: Token
    request_id: Token
    priority: int | None = Field(default=None, ge=0, le=9)
    qos: Token | None = None
    task_ids: list[Token] | None = None
    at: Time

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.priority is None and self.qos is None:
            raise ValueError("a prioritize request needs a priority or a qos class")
        return self


class StartedTask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    task_id: Token
    job_id: Token
    attempt: int = Field(ge=1)
    delivery: int = Field(ge=1)
    token: int = Field(ge=0)
    """The fencing token of this delivery (fleet.core.fencing): grows with every dispatch and delivery."""


class StartReport(Record):
    """A worker began running a batch of deliveries (one message per fetched batch)."""

    worker_id: Token
    at: Time
    tasks: list[StartedTask]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)
    type: str = Field(max_length=500)
    message: str
    traceback: str | None = None
    retryable: bool = True
    failure: FailureClass = FailureClass.ERROR
    """What kind of failure this was; each kind has its own retry budget."""
    retry_after_s: Delay | None = None
    """The handler asked for this delay before the next attempt (``fleet.worker.errors.Retry``);
    negative, NaN and out-of-range values are cut to 0 .. MAX_DELAY_S."""


Outcome = Literal["succeeded", "failed", "cancelled"]


class DoneReport(Record):
    """The outcome of one delivery. Its subject is ``fleet.report.done.<job>.<task>``; the one the
    scheduler accepts is copied to ``fleet.result.<job>.<task>``."""

    task_id: Token
    job_id: Token
    attempt: int = Field(ge=1)
    delivery: int = Field(ge=1)
    token: int = Field(ge=0)
    worker_id: Token
    outcome: Outcome
    result: Payload | None = None
    items: int | None = None
    """For a bundle: how many items the task had (the result is then a list, one value per item)."""
    error: ErrorInfo | None = None
    started_at: Time
    finished_at: Time


class TaskEvent(Record):
    """A progress update or log line of one task (``fleet.event.<job>.<task>.<kind>``)."""

    kind: Literal["progress", "log"]
    job_id: Token
    task_id: Token
    at: Time
    attempt: int | None = None
    token: int | None = None
    progress: float | None = None
    message: str | None = None
    level: str | None = None


class TaskRecord(Record):
    """A task's state of record, the one message on ``fleet.state.<job>.<task>`` (written only by
    the scheduler, kept until the job is archived). Every write is republished into FLEET_EVENTS as its history."""

    job_id: Token
    task_id: Token
    state: TaskState
    rev: int = Field(ge=1)
    """Grows with every write of this record."""
    at: Time
    queue: Token = "default"
    attempt: int = Field(default=1, ge=1)
    dispatch: int = Field(default=0, ge=0)
    """How many times the task was put on the work queue."""
    seq: int | None = None
    """Stream sequence of the current dispatch in FLEET_TASKS (the base of its fencing tokens)."""
    token: int | None = None
    """The current holder's fencing token (while running), or the accepted outcome's."""
    worker_id: str | None = None
    reason: str | None = None
    failure: FailureClass | None = None
    """Class of the last failure."""
    lost: int = 0
    infra: int = 0
    preempted: int = 0
    not_before: Time | None = None
    """While retrying: when the next attempt may be dispatched."""
    intake_seq: int | None = None
    """Stream sequence of the envelope in FLEET_INTAKE."""
    blobs: list[str] = []
    """Object-store names this task's payloads use (deleted with the job)."""
    retry: RetryPolicy | None = None
    """The task's retry budgets when they differ from the defaults."""
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)
    resources: Resources | None = None
    """The task's resource request when it differs from the defaults."""
    limits: dict[str, float] = {}
    placed: str | None = None
    """While dispatched or running: the worker it was placed on (it asked for resources)."""


class JobRecord(Record):
    """A job's summary: kept in the ``fleet_jobs`` KV bucket and published as a job event."""

    job_id: Token
    name: str = ""
    tenant: str = "default"
    queue: str = "default"
    total: int | None = None
    submitted: int = 0
    counts: dict[str, int] = {}
    failures: dict[str, int] = {}
    """Failed and dead tasks by the class of their last failure."""
    retries: int = 0
    requeues: int = 0
    stale_reports: int = 0
    """Reports refused because their sender no longer held the task (fenced)."""
    created_at: Time
    updated_at: Time
    finished_at: Time | None = None
    cancelled: bool = False
    retried_at: Time | None = None
    """``at`` of the last retry request applied (an older or repeated one is ignored)."""
    waiting: str | None = None
    """Why the job's queued tasks are not running yet (``quota lab-a 50/50``, ``priority``...)."""
    priority: int | None = None
    """The priority ``fleet prioritize`` set for the whole job."""
    qos: str | None = None
    project: str | None = None

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in _TERMINAL_NAMES)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


_TERMINAL_NAMES = frozenset(str(s) for s in TERMINAL)


class HeldTask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    job_id: Token
    task_id: Token
    token: int = Field(ge=0)


class Heartbeat(Record):
    """Worker liveness and load: a core-NATS request every heartbeat interval, from a thread of its
    own (a busy handler cannot starve it). The scheduler answers with a :class:`HeartbeatReply`."""

    worker_id: Token
    queue: Token
    host: str
    pid: int
    slots: int
    busy: int
    held: list[HeldTask] = []
    at: Time
    interval_s: float = Field(gt=0, le=3600)
    stopping: bool = False
    resources: Resources | None = None
    """What the worker has (cpus, gpus, memory, labels); tasks asking for resources are placed by it."""


class Fence(BaseModel):
    """Stop running this delivery: it is no longer the task's holder (or the task is over)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    job_id: Token
    task_id: Token
    token: int
    reason: str
    ack: bool = False
    """Acknowledge the message (the task is finished or the dispatch is stale). False when a newer
    delivery of the *same* message holds it: an ack would end that holder's lease."""


class HeartbeatReply(Record):
    fence: list[Fence] = []
    confirmed: list[int] = []
    """Tokens of this worker's deliveries that the scheduler records as their task's holder. A
    handler about to make an irreversible side effect may wait for its token here
    (``ctx.confirm()``): exactly one delivery of a task is ever confirmed at a time."""
    known: bool = True
    """False when the scheduler had declared this worker lost (its tasks went to others)."""


class TokenRequest(Record):
    """A worker asks for a lease of rate-limit tokens (``ctx.rate_limit``), on
    ``fleet.ctl.tokens.<limiter>``; ``throttled`` reports that the upstream said 429."""

    limiter: Token
    want: float = Field(gt=0, le=1e6)
    worker_id: Token
    throttled: bool = False
    retry_after_s: Delay | None = None


class TokenGrant(Record):
    """The scheduler's answer: ``granted`` tokens, usable for ``lease_s`` seconds (unused ones
    lapse); with none granted, ``retry_in_s`` says when to ask again."""

    limiter: Token
    granted: float = Field(ge=0)
    lease_s: float = Field(ge=0)
    retry_in_s: float = Field(default=0.0, ge=0)
    reason: str | None = None


class BudgetNotice(Record):
    """A tenant crossed a budget threshold (``fleet.event._tenant.<tenant>.budget``)."""

    tenant: Token
    resource: Literal["cpu-hours", "gpu-hours"]
    used: float = Field(ge=0)
    limit: float = Field(ge=0)
    threshold: float = Field(gt=0, le=1)
    held: bool = False
    """At 100 % with ``on_budget: hold``: the tenant's new work waits for the next period."""
    at: Time
    message: str = ""


class DeadLetter(Record):
    """Input the scheduler could not admit, or a task that ended dead, kept for inspection."""

    origin: str
    subject: str
    reason: str
    at: Time
    job_id: str | None = None
    task_id: str | None = None
    failure: FailureClass | None = None
    attempt: int | None = None
    raw: bytes = b""
