"""Idempotent creation of every stream, consumer, KV bucket and object store fleet uses.

Safe to call from every process at start-up: objects that exist are left as they are unless a
setting that fleet owns (retention age, lease) differs, in which case the current config is read,
changed and written back (never a fresh config: jetstream.md pitfall 27).
"""

from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError

from broker import names

log = logging.getLogger("fleet.broker")

HOUR = 3600.0


@dataclasses.dataclass(frozen=True)
class BusConfig:
    """What the streams and consumers are created with."""

    history_s: float = 72 * HOUR
    """How long results, events and job records are kept (at least 24 h by design)."""
    dlq_history_s: float = 14 * 24 * HOUR
    dedup_window_s: float = 600.0
    """Nats-Msg-Id de-duplication window of the intake, task and report streams."""
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
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
        **kw,  # type: ignore[arg-type]
    )


def stream_configs(cfg: BusConfig) -> list[api.StreamConfig]:
    wq, limits = api.RetentionPolicy.WORK_QUEUE, api.RetentionPolicy.LIMITS
    return [
        _stream(names.INTAKE_STREAM, [names.INTAKE_SUBJECTS], wq, cfg),
        _stream(names.TASKS_STREAM, [names.TASKS_SUBJECTS], wq, cfg),
        _stream(names.REPORTS_STREAM, [names.REPORTS_SUBJECTS], limits, cfg, max_age=cfg.history_s),
        _stream(names.EVENTS_STREAM, [names.EVENTS_SUBJECTS], limits, cfg, max_age=cfg.history_s),
        _stream(names.DLQ_STREAM, [names.DLQ_SUBJECTS], limits, cfg, max_age=cfg.dlq_history_s),
    ]


async def ensure_stream(js: JetStreamContext, want: api.StreamConfig, *, authoritative: bool = False) -> None:
    """Create ``want`` if missing; only an ``authoritative`` caller (the scheduler) changes retention."""
    try:
        info = await js.stream_info(want.name or "")
    except NotFoundError:
        await js.add_stream(want)
        return
    have = info.config
    if authoritative and (have.max_age != want.max_age or have.subjects != want.subjects):
        have.max_age, have.subjects = want.max_age, want.subjects
        await js.update_stream(have)


async def ensure_consumer(js: JetStreamContext, stream: str, want: api.ConsumerConfig) -> api.ConsumerInfo:
    name = want.durable_name or ""
    """Create the durable consumer if missing; an existing one keeps its settings (its lease wins)."""
    info: api.ConsumerInfo
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        info = await js.add_consumer(stream, want)
    return info


async def ensure_bus(
    js: JetStreamContext, cfg: BusConfig = BusConfig(), *, authoritative: bool = False
) -> None:
    """Streams, scheduler consumers, the jobs KV bucket and the blob store."""
    for sc in stream_configs(cfg):
        await ensure_stream(js, sc, authoritative=authoritative)
    intake = api.ConsumerConfig(
        durable_name=names.INTAKE_CONSUMER,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=1_000_000,
        max_deliver=-1,
        filter_subject=names.INTAKE_SUBJECTS,
    )
    reports = api.ConsumerConfig(
        durable_name=names.REPORTS_CONSUMER,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=60.0,
        max_ack_pending=100_000,
        max_deliver=-1,
        filter_subject=names.REPORTS_SUBJECTS,
    )
    await ensure_consumer(js, names.INTAKE_STREAM, intake)
    await ensure_consumer(js, names.REPORTS_STREAM, reports)
    try:
        await js.key_value(names.JOBS_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(bucket=names.JOBS_BUCKET, history=1, ttl=cfg.history_s, replicas=cfg.replicas)
        )
    try:
        await js.object_store(names.BLOBS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(
            names.BLOBS_BUCKET, config=api.ObjectStoreConfig(ttl=cfg.history_s, replicas=cfg.replicas)
        )


async def ensure_queue(
    js: JetStreamContext, queue: str, *, lease_s: float, cfg: BusConfig = BusConfig()
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
    )
    return await ensure_consumer(js, names.TASKS_STREAM, want)
