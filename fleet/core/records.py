"""Wire records: frozen, versioned pydantic models, encoded as one msgpack map each.

These are the shapes specified in ``clients/PROTOCOL.md``; nothing here holds a connection, a
lock or a callback (runtime handles live in the worker and scheduler). Unknown fields are ignored
so that newer clients can add optional fields; a wrong type or a missing required field is an
:class:`InvalidRecord` that names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from broker import codec, names
from fleet.core.states import TERMINAL, TaskState

PROTOCOL_VERSION = 1
_HANDLER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*")


class InvalidRecord(ValueError):
    """A message that decodes but does not match its record schema."""


def _token(v: str) -> str:
    return names.check_token(v, "identifier")


Token = Annotated[str, AfterValidator(_token)]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=False, populate_by_name=True)

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
    model_config = ConfigDict(frozen=True, extra="ignore")
    cpus: float = Field(default=1.0, ge=0)
    gpus: int = Field(default=0, ge=0)
    memory_mb: int = Field(default=0, ge=0)


class RetryPolicy(BaseModel):
    """How many attempts a task gets and how long to wait between them (see fleet.core.retry)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    max_attempts: int = Field(default=3, ge=1, le=1000)
    backoff_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0)
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
    priority: int = Field(default=5, ge=0, le=9)
    resources: Resources = Resources()
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(default=None, gt=0)
    idempotency_key: str | None = Field(default=None, max_length=256)
    created_at: float
    attempt: int = Field(default=1, ge=1)
    not_before: float | None = None
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
    created_at: float
    labels: dict[str, str] = {}


class CancelRequest(Record):
    job_id: Token
    task_id: Token | None = None
    reason: str = "cancelled by user"
    at: float


class StartedTask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    task_id: Token
    job_id: Token
    attempt: int
    delivery: int


class StartReport(Record):
    """A worker began running a batch of deliveries (one message per fetched batch)."""

    worker_id: Token
    at: float
    tasks: list[StartedTask]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    type: str
    message: str
    traceback: str | None = None
    retryable: bool = True
    retry_after_s: float | None = Field(default=None, ge=0)
    """The handler asked for this delay before the next attempt (``fleet.worker.errors.Retry``)."""


Outcome = Literal["succeeded", "failed", "cancelled"]


class DoneReport(Record):
    """The outcome of one attempt. Its subject is ``fleet.report.done.<job>.<task>``."""

    task_id: Token
    job_id: Token
    attempt: int = Field(ge=1)
    delivery: int = Field(ge=1)
    worker_id: Token
    outcome: Outcome
    result: Payload | None = None
    items: int | None = None
    """For a bundle: how many items the task had (the result is then a list, one value per item)."""
    error: ErrorInfo | None = None
    started_at: float
    finished_at: float
    envelope: TaskEnvelope | None = None
    """Sent back on failure so the scheduler can schedule the next attempt without a store."""


class TaskEvent(Record):
    """A state change, progress update or log line of one task (``fleet.event.<job>.<task>.<kind>``)."""

    kind: Literal["state", "progress", "log"]
    job_id: Token
    task_id: Token
    at: float
    state: TaskState | None = None
    attempt: int | None = None
    worker_id: str | None = None
    reason: str | None = None
    progress: float | None = None
    message: str | None = None
    level: str | None = None


class JobRecord(Record):
    """A job's summary: kept in the ``fleet_jobs`` KV bucket and published as a job event."""

    job_id: Token
    name: str = ""
    tenant: str = "default"
    queue: str = "default"
    total: int | None = None
    submitted: int = 0
    counts: dict[str, int] = {}
    retries: int = 0
    requeues: int = 0
    created_at: float
    updated_at: float
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in _TERMINAL_NAMES)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


_TERMINAL_NAMES = frozenset(str(s) for s in TERMINAL)


class Heartbeat(Record):
    """Worker liveness and load, on core NATS every heartbeat interval."""

    worker_id: Token
    queue: Token
    host: str
    pid: int
    slots: int
    busy: int
    tasks: list[str] = []
    at: float
    interval_s: float
    stopping: bool = False


class DeadLetter(Record):
    """Input the scheduler could not admit, kept with its raw bytes for inspection."""

    origin: str
    subject: str
    reason: str
    at: float
    job_id: str | None = None
    task_id: str | None = None
    raw: bytes = b""
