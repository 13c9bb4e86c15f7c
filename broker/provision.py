"""Idempotent creation of every stream, consumer, KV bucket and object store fleet uses.

Safe to call from every process at start-up: objects that exist are left as they are unless a
setting that fleet owns (history limits, subjects, the state republish) differs and the caller is the
scheduler, in which case the current config is read, changed and written back (never a fresh
config: jetstream.md pitfall 27). A stream whose retention differs from what this version needs
(a store made by an older fleet) is an error that says so.

Records (the intake task store, the state of record, results, job records, offloaded payloads)
have no age limit: they are removed when their job is archived. Only history (events, dead
letters) is bounded, by age and by bytes.
"""

from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError

from broker import names

log = logging.getLogger("fleet.broker")

HOUR = 3600.0
GIB = 1 << 30


class ProvisionError(RuntimeError):
    """A stream or consumer exists with a configuration this version of fleet cannot use."""


@dataclasses.dataclass(frozen=True)
class BusConfig:
    """What the streams and consumers are created with."""

    history_s: float = 72 * HOUR
    """How long progress, log, state-history and job events are kept."""
    history_bytes: int = 4 * GIB
    """Size cap of the event history (oldest events go first)."""
    dlq_history_s: float = 14 * 24 * HOUR
    dlq_bytes: int = 1 * GIB
    dedup_window_s: float = 600.0
    """Nats-Msg-Id de-duplication window of the intake, task, report, state and result streams."""
    replicas: int = 1
    max_inflight: int = 65536
    """MaxAckPending of each work-queue consumer: the most tasks a queue can have running at once."""
    max_waiting: int = 4096
    """Outstanding pull requests per queue consumer (>= workers x concurrent pulls)."""


def _stream(
    name: str, subjects: list[str], retention: api.RetentionPolicy, cfg: BusConfig, **kw: object
) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        subjects=subjects,
        retention=retention,
        storage=api.StorageType.FILE,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.dedup_window_s,
        allow_direct=True,
        **kw,  # type: ignore[arg-type]
    )


def stream_configs(cfg: BusConfig) -> list[api.StreamConfig]:
    wq, limits = api.RetentionPolicy.WORK_QUEUE, api.RetentionPolicy.LIMITS
    old, new = api.DiscardPolicy.OLD, api.DiscardPolicy.NEW
    # every stored state of record is republished, in order, onto its history subject in FLEET_EVENTS
    history = api.RePublish(src=names.STATE_TO_EVENT[0], dest=names.STATE_TO_EVENT[1])
    return [
        # the task store: one message per subject, a resubmission is refused (never replaces)
        _stream(
            names.INTAKE_STREAM,
            list(names.INTAKE_SUBJECTS),
            limits,
            cfg,
            discard=new,
            max_msgs_per_subject=1,
            discard_new_per_subject=True,
        ),
        _stream(names.TASKS_STREAM, [names.TASKS_SUBJECTS], wq, cfg, discard=old),
        _stream(names.REPORTS_STREAM, [names.REPORTS_SUBJECTS], wq, cfg, discard=old),
        _stream(
            names.STATE_STREAM,
            [names.STATE_SUBJECTS],
            limits,
            cfg,
            discard=old,
            max_msgs_per_subject=1,
            republish=history,
        ),
        _stream(
            names.RESULTS_STREAM, [names.RESULTS_SUBJECTS], limits, cfg, discard=old, max_msgs_per_subject=1
        ),
        _stream(
            names.EVENTS_STREAM,
            [names.EVENTS_SUBJECTS],
            limits,
            cfg,
            discard=old,
            max_age=cfg.history_s,
            max_bytes=cfg.history_bytes,
        ),
        _stream(
            names.DLQ_STREAM,
            [names.DLQ_SUBJECTS],
            limits,
            cfg,
            discard=old,
            max_age=cfg.dlq_history_s,
            max_bytes=cfg.dlq_bytes,
        ),
    ]


def _owned(c: api.StreamConfig) -> tuple[object, ...]:
    rp = (c.republish.src, c.republish.dest) if c.republish else None
    return (c.max_age or 0.0, c.max_bytes or -1, tuple(c.subjects or []), rp)


async def ensure_stream(js: JetStreamContext, want: api.StreamConfig, *, authoritative: bool = False) -> None:
    """Create ``want`` if missing; only an ``authoritative`` caller (the scheduler) changes limits."""
    try:
        info = await js.stream_info(want.name or "")
    except NotFoundError:
        await js.add_stream(want)
        return
    have = info.config
    if have.retention != want.retention or (have.max_msgs_per_subject or -1) != (
        want.max_msgs_per_subject or -1
    ):
        raise ProvisionError(
            f"stream {want.name} exists with retention {have.retention} and "
            f"{have.max_msgs_per_subject} messages per subject; this fleet needs {want.retention} and "
            f"{want.max_msgs_per_subject}. The store was made by an older fleet: point fleet at a new "
            "store (for example remove .fleet/data) or delete the stream."
        )
    if authoritative and _owned(have) != _owned(want):
        have.max_age, have.max_bytes, have.subjects = want.max_age, want.max_bytes, want.subjects
        have.republish = want.republish
        await js.update_stream(have)


async def ensure_consumer(js: JetStreamContext, stream: str, want: api.ConsumerConfig) -> api.ConsumerInfo:
    """Create the durable consumer if missing; an existing one keeps its settings (its lease wins)."""
    name = want.durable_name or ""
    info: api.ConsumerInfo
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        info = await js.add_consumer(stream, want)
    return info


SCHEDULER_ACK_WAIT_S = 10.0
"""AckWait of the scheduler's input consumers: how long inputs a dead scheduler held wait before
another scheduler gets them (a live one keeps slow batches with ``+WPI``; a restarted one also
resets its consumers at start)."""


def _scheduler_consumer(name: str, ack_all: bool = True, **kw: object) -> api.ConsumerConfig:
    """``ack_all``: one ack covers a whole batch (the scheduler applies a batch in order, then acks
    its last message); a work-queue stream requires explicit acks."""
    return api.ConsumerConfig(
        durable_name=name,
        ack_policy=api.AckPolicy.ALL if ack_all else api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=SCHEDULER_ACK_WAIT_S,
        max_ack_pending=100_000,
        max_deliver=-1,
        **kw,  # type: ignore[arg-type]
    )


async def ensure_bus(
    js: JetStreamContext, cfg: BusConfig = BusConfig(), *, authoritative: bool = False
) -> None:
    """Streams, scheduler consumers, the jobs and policy KV buckets and the blob store."""
    for sc in stream_configs(cfg):
        await ensure_stream(js, sc, authoritative=authoritative)
    consumers = [
        (names.INTAKE_STREAM, _scheduler_consumer(names.INTAKE_CONSUMER, filter_subject=names.INTAKE_TASKS)),
        (
            names.INTAKE_STREAM,
            _scheduler_consumer(names.CONTROL_CONSUMER, filter_subjects=list(names.CONTROL_FILTERS)),
        ),
        (
            names.REPORTS_STREAM,
            _scheduler_consumer(names.REPORTS_CONSUMER, ack_all=False, filter_subject=names.REPORTS_SUBJECTS),
        ),
    ]
    for stream, want in consumers:
        await ensure_consumer(js, stream, want)
    try:
        await js.key_value(names.JOBS_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(bucket=names.JOBS_BUCKET, history=1, replicas=cfg.replicas)
        )
    try:
        await js.key_value(names.POLICY_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(bucket=names.POLICY_BUCKET, history=5, replicas=cfg.replicas)
        )
    try:
        await js.object_store(names.BLOBS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(names.BLOBS_BUCKET, config=api.ObjectStoreConfig(replicas=cfg.replicas))


DEFAULT_LEASE_S = 60.0
"""AckWait of a new queue consumer. The scheduler requeues on missed heartbeats within seconds;
the lease is only the backstop for when the scheduler itself is down."""


async def ensure_queue(
    js: JetStreamContext,
    queue: str,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    cfg: BusConfig = BusConfig(),
    inactive_s: float | None = None,
) -> api.ConsumerInfo:
    """The durable pull consumer workers of ``queue`` share. Its AckWait is the task lease."""
    names.check_token(queue, "queue")
    want = api.ConsumerConfig(
        durable_name=names.queue_consumer(queue),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=lease_s,
        max_deliver=-1,
        max_ack_pending=cfg.max_inflight,
        max_waiting=cfg.max_waiting,
        filter_subject=names.queue_filter(queue),
        inactive_threshold=inactive_s,
    )
    return await ensure_consumer(js, names.TASKS_STREAM, want)
