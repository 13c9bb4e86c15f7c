"""The Python SDK: submit work, follow it, collect results, cancel.

::

    async with await FleetClient.connect("nats://127.0.0.1:4222") as fleet:
        job = await fleet.submit_job("examples.montecarlo:estimate", items=range(2000), bundle=20)
        record = await fleet.wait_job(job)
        async for task_id, value in fleet.results(job):
            ...

Submissions go to the intake stream, which keeps every task's envelope until its job is archived
(the scheduler validates and admits them). Task states are read from the state of record
(FLEET_STATE), accepted results from FLEET_RESULTS and job summaries from the ``fleet_jobs`` KV
bucket, so a client needs no connection to the scheduler itself. :class:`SyncFleetClient` wraps the same calls for plain code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)

from broker import blobs, names, reader
from broker.connection import connect, shutdown
from broker.provision import ensure_bus
from broker.publisher import Publisher
from fleet.core.failures import FailureClass
from fleet.core.records import (
    CancelRequest,
    DeadLetter,
    DoneReport,
    JobRecord,
    JobSpec,
    Payload,
    PrioritizeRequest,
    Resources,
    RetryPolicy,
    RetryRequest,
    TaskEnvelope,
    TaskEvent,
    TaskRecord,
)
from fleet.core.states import TERMINAL, TaskState
from fleet.policy import config as policy_config
from fleet.policy.config import Policy

SUBMIT_WINDOW = 1000
"""Submissions published per bounded async window."""


class FleetClientError(RuntimeError):
    """Base of SDK errors."""


class TaskFailed(FleetClientError):
    def __init__(self, job_id: str, task_id: str, state: str, reason: str | None) -> None:
        super().__init__(f"task {job_id}/{task_id} ended {state}: {reason or 'no reason given'}")
        self.job_id, self.task_id, self.state, self.reason = job_id, task_id, state, reason


class JobNotFound(FleetClientError):
    pass


def new_job_id() -> str:
    return "j-" + uuid.uuid4().hex[:16]


def task_id_for(index: int) -> str:
    return f"t{index:07d}"


class FleetClient:
    def __init__(self, nc: NATS, *, own_connection: bool = True) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.pub = Publisher(nc)
        self._own = own_connection

    @classmethod
    async def connect(cls, url: str, *, provision: bool = True) -> FleetClient:
        nc = await connect(url, name="fleet-client")
        client = cls(nc)
        if provision:
            await ensure_bus(client.js)
        return client

    async def close(self) -> None:
        if self._own:
            with contextlib.suppress(Exception):
                await shutdown(self.nc)

    async def __aenter__(self) -> FleetClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- building ----------------------------------------------------------------------------------
    async def envelope(
        self,
        *,
        job_id: str,
        task_id: str,
        handler: str | None = None,
        command: Sequence[str] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        items: Sequence[Any] | None = None,
        tenant: str = "default",
        queue: str = "default",
        priority: int = 5,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        qos: str | None = None,
        project: str | None = None,
        limits: Mapping[str, float] | None = None,
    ) -> TaskEnvelope:
        """Validate and build one task envelope (large inputs are offloaded to the object store)."""
        inputs: dict[str, Any] = {"args": list(args), "kwargs": dict(kwargs or {})}
        if items is not None:
            inputs["items"] = list(items)
        payload = Payload.model_validate(await blobs.make_payload(self.js, inputs, job=job_id))
        return TaskEnvelope(
            task_id=task_id,
            job_id=job_id,
            handler=handler,
            command=list(command) if command is not None else None,
            payload=payload,
            tenant=tenant,
            queue=queue,
            priority=priority,
            retry=retry or RetryPolicy(),
            timeout_s=timeout_s,
            resources=Resources.model_validate(resources or {}),
            idempotency_key=idempotency_key,
            created_at=time.time(),
            labels=dict(labels or {}),
            qos=qos,
            project=project,
            limits=dict(limits or {}),
        )

    # -- submitting --------------------------------------------------------------------------------
    async def declare_job(
        self,
        job_id: str,
        *,
        name: str = "",
        total: int | None,
        tenant: str = "default",
        queue: str = "default",
        qos: str | None = None,
        project: str | None = None,
    ) -> None:
        spec = JobSpec(
            job_id=job_id,
            name=name,
            total=total,
            tenant=tenant,
            queue=queue,
            qos=qos,
            project=project,
            created_at=time.time(),
        )
        await self.pub.publish(names.intake_job(job_id), spec.to_wire(), msg_id=names.msgid_job(job_id))

    async def submit_many(self, envelopes: Iterable[TaskEnvelope], *, window: int = SUBMIT_WINDOW) -> int:
        """Publish envelopes in bounded windows; returns how many were submitted."""
        batch: list[tuple[str, bytes, str | None]] = []
        n = 0
        for env in envelopes:
            msg_id = (
                names.msgid_idempotent(env.tenant, env.idempotency_key)
                if env.idempotency_key
                else names.msgid_submit(env.job_id, env.task_id)
            )
            batch.append((names.intake_task(env.job_id, env.task_id), env.to_wire(), msg_id))
            if len(batch) >= window:
                await self.pub.publish_many(batch)
                n += len(batch)
                batch = []
        if batch:
            await self.pub.publish_many(batch)
            n += len(batch)
        return n

    async def submit(
        self,
        handler: str | None = None,
        *args: Any,
        command: Sequence[str] | None = None,
        job_id: str | None = None,
        name: str = "",
        **options: Any,
    ) -> tuple[str, str]:
        """Submit one task as a one-task job; returns ``(job_id, task_id)``."""
        job_id = names.check_token(job_id or new_job_id(), "job id")
        env = await self.envelope(
            job_id=job_id, task_id=task_id_for(0), handler=handler, command=command, args=args, **options
        )
        await self.declare_job(
            job_id,
            name=name or (handler or " ".join(command or [])),
            total=1,
            tenant=env.tenant,
            queue=env.queue,
        )
        await self.submit_many([env])
        return job_id, env.task_id

    async def submit_job(
        self,
        handler: str | None = None,
        *,
        items: Iterable[Any],
        command: Sequence[str] | None = None,
        bundle: int = 1,
        job_id: str | None = None,
        name: str = "",
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Submit a sweep: ``items`` split into tasks of ``bundle`` items each. Returns the job id."""
        if bundle < 1:
            raise ValueError("bundle must be at least 1")
        job_id = names.check_token(job_id or new_job_id(), "job id")
        values = list(items)
        chunks = [values[i : i + bundle] for i in range(0, len(values), bundle)]
        queue, tenant = options.get("queue", "default"), options.get("tenant", "default")
        _check_encodable(values, args, kwargs)

        async def build(i: int, chunk: list[Any]) -> TaskEnvelope:
            return await self.envelope(
                job_id=job_id,
                task_id=task_id_for(i),
                handler=handler,
                command=command,
                args=args,
                kwargs=kwargs,
                items=chunk,
                **options,
            )

        first = [await build(j, c) for j, c in enumerate(chunks[:SUBMIT_WINDOW])]  # validates every option
        await self.declare_job(
            job_id,
            name=name or handler or "",
            total=len(chunks),
            tenant=tenant,
            queue=queue,
            qos=options.get("qos"),
            project=options.get("project"),
        )
        await self.submit_many(first)
        for start in range(SUBMIT_WINDOW, len(chunks), SUBMIT_WINDOW):
            part = chunks[start : start + SUBMIT_WINDOW]
            envs = [await build(start + j, c) for j, c in enumerate(part)]
            await self.submit_many(envs)
        return job_id

    async def cancel(
        self, job_id: str, task_id: str | None = None, reason: str = "cancelled by user"
    ) -> None:
        req = CancelRequest(job_id=job_id, task_id=task_id, reason=reason, at=time.time())
        await self.pub.publish(
            names.intake_cancel(job_id, task_id), req.to_wire(), names.msgid_cancel(job_id, task_id)
        )

    async def retry(
        self,
        job_id: str,
        *,
        failures: Sequence[FailureClass | str] | None = None,
        include_dead: bool = False,
        task_ids: Sequence[str] | None = None,
    ) -> str:
        """Run a job's failed tasks again (only those of ``failures`` classes, if given); returns the
        request id. Dead tasks are included only with ``include_dead``."""
        request_id = "r-" + uuid.uuid4().hex[:12]
        req = RetryRequest(
            job_id=job_id,
            request_id=request_id,
            failures=[FailureClass(f) for f in failures] if failures else None,
            include_dead=include_dead,
            task_ids=list(task_ids) if task_ids else None,
            at=time.time(),
        )
        await self.pub.publish(names.intake_retry(job_id, request_id), req.to_wire())
        return request_id

    async def prioritize(
        self,
        job_id: str,
        priority: int | None = None,
        *,
        qos: str | None = None,
        task_ids: Sequence[str] | None = None,
    ) -> str:
        """Change the priority (0-9, 9 first) or QoS class of a job's waiting tasks (all of them, and
        its later ones, unless ``task_ids`` names some); returns the request id."""
        request_id = "p-" + uuid.uuid4().hex[:12]
        req = PrioritizeRequest(
            job_id=job_id,
            request_id=request_id,
            priority=priority,
            qos=qos,
            task_ids=list(task_ids) if task_ids else None,
            at=time.time(),
        )
        await self.pub.publish(
            names.intake_prioritize(job_id, request_id),
            req.to_wire(),
            names.msgid_prioritize(job_id, request_id),
        )
        return request_id

    # -- policy --------------------------------------------------------------------------------------
    async def _policy_kv(self) -> Any:
        try:
            return await self.js.key_value(names.POLICY_BUCKET)
        except BucketNotFoundError:
            await ensure_bus(self.js)  # nothing ran here yet: the policy may come first
            return await self.js.key_value(names.POLICY_BUCKET)

    async def policy(self) -> tuple[Policy, int]:
        """The stored scheduling policy and its KV revision (0 and the defaults if none is stored)."""
        kv = await self._policy_kv()
        try:
            entry = await kv.get(names.POLICY_KEY)
        except (KeyNotFoundError, NotFoundError):
            return Policy(), 0
        return policy_config.load((entry.value or b"").decode(), "stored policy"), int(entry.revision or 0)

    async def set_policy(self, policy: Policy | str, revision: int | None = None) -> int:
        """Check and store a policy (YAML text or a Policy); with ``revision``, only if the stored one
        is still that revision (0: none stored). The running scheduler applies it at once."""
        p = policy_config.load(policy) if isinstance(policy, str) else policy
        kv = await self._policy_kv()
        data = p.to_yaml().encode()
        if revision is None:
            rev = await kv.put(names.POLICY_KEY, data)
        elif revision == 0:
            rev = await kv.create(names.POLICY_KEY, data)
        else:
            rev = await kv.update(names.POLICY_KEY, data, last=revision)
        await self.nc.publish(names.POLICY_CHANGED, b"")
        return int(rev)

    async def update_policy(self, change: Callable[[Policy], Policy], tries: int = 5) -> Policy:
        """Read-modify-write of the stored policy, retried when someone else changed it meanwhile."""
        for _ in range(tries):
            current, rev = await self.policy()
            new = change(current)
            try:
                await self.set_policy(new, rev)
                return new
            except (KeyWrongLastSequenceError, BadRequestError):
                continue
        raise FleetClientError("the policy kept changing under us; try again")

    async def usage(self) -> dict[str, dict[str, Any]]:
        """Usage accounts by tenant, as the scheduler last saved them (``fleet.policy.budget``)."""
        kv = await self._policy_kv()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            if key.startswith("usage."):
                with contextlib.suppress(KeyNotFoundError, NotFoundError, ValueError):
                    out[key.removeprefix("usage.")] = json.loads((await kv.get(key)).value or b"{}")
        return out

    # -- following ---------------------------------------------------------------------------------
    async def job(self, job_id: str) -> JobRecord | None:
        kv = await self.js.key_value(names.JOBS_BUCKET)
        try:
            entry = await kv.get(names.check_token(job_id, "job id"))
        except KeyNotFoundError:
            return None
        return JobRecord.from_wire(entry.value) if entry.value else None

    async def jobs(self) -> list[JobRecord]:
        kv = await self.js.key_value(names.JOBS_BUCKET)
        try:
            keys = await kv.keys()
        except Exception:  # NoKeysError on an empty bucket
            return []
        records = [await self.job(k) for k in keys]
        return sorted((r for r in records if r is not None), key=lambda r: r.created_at)

    async def wait_job(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> JobRecord:
        """Wait until a job has finished (every task terminal); returns its final summary."""
        async with asyncio.timeout(timeout):
            async for record in self.job_updates(job_id, poll=poll):
                if record.finished:
                    return record
        raise JobNotFound(job_id)  # pragma: no cover - the iterator only ends on finish

    async def job_updates(self, job_id: str, poll: float = 0.25) -> AsyncIterator[JobRecord]:
        """Yield a job's summary whenever it changes, until it finishes (KV watch)."""
        kv = await self.js.key_value(names.JOBS_BUCKET)
        watcher = await kv.watch(names.check_token(job_id, "job id"))
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=max(poll, 1.0))  # type: ignore[no-untyped-call]
                except TimeoutError:
                    continue
                if entry is None or not entry.value:
                    continue
                record = JobRecord.from_wire(entry.value)
                yield record
                if record.finished:
                    return
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def state(self, job_id: str, task_id: str) -> TaskRecord | None:
        """One task's state of record."""
        try:
            msg = await self.js.get_last_msg(names.STATE_STREAM, names.state_subject(job_id, task_id))
        except NotFoundError:
            return None
        return TaskRecord.from_wire(msg.data or b"")

    async def tasks(self, job_id: str) -> AsyncIterator[TaskRecord]:
        """Every task's state of record, one pass over the stream."""
        subject = names.job_state_filter(names.check_token(job_id, "job id"))
        async for msg in reader.replay(self.js, names.STATE_STREAM, subject, last_per_subject=True):
            yield TaskRecord.from_wire(msg.data)

    async def report(self, job_id: str, task_id: str) -> DoneReport | None:
        """The accepted outcome of a task (never a fenced worker's)."""
        try:
            msg = await self.js.get_last_msg(names.RESULTS_STREAM, names.result_subject(job_id, task_id))
        except NotFoundError:
            return None
        return DoneReport.from_wire(msg.data or b"")

    async def value(self, report: DoneReport) -> Any:
        if report.result is None:
            return None
        return await blobs.load_payload(
            self.js, report.result.model_dump(exclude_none=True), job=report.job_id
        )

    async def result(self, job_id: str, task_id: str, timeout: float | None = None) -> Any:
        """Wait for one task to finish; return its value or raise :class:`TaskFailed`."""
        sub = await self.nc.subscribe(names.state_subject(job_id, task_id))
        try:
            async with asyncio.timeout(timeout):
                record = await self.state(job_id, task_id)
                while record is None or record.state not in TERMINAL:
                    record = TaskRecord.from_wire((await sub.next_msg(timeout=None)).data)
        finally:
            await sub.unsubscribe()
        if record.state != TaskState.SUCCEEDED:
            raise TaskFailed(job_id, task_id, str(record.state), record.reason)
        report = await self.report(job_id, task_id)
        if report is None:
            raise TaskFailed(job_id, task_id, "succeeded", "result record missing (job archived?)")
        return await self.value(report)

    async def results(self, job_id: str) -> AsyncIterator[tuple[DoneReport, Any]]:
        """Every finished task's accepted outcome with its decoded value, in stream order."""
        subject = names.job_results_filter(names.check_token(job_id, "job id"))
        async for msg in reader.replay(self.js, names.RESULTS_STREAM, subject):
            report = DoneReport.from_wire(msg.data)
            yield report, await self.value(report) if report.outcome == "succeeded" else None

    async def dead_letters(self, job_id: str | None = None) -> AsyncIterator[DeadLetter]:
        """Dead letters, oldest first: of one job's tasks, or all (including undecodable input)."""
        subject = names.job_dlq_filter(names.check_token(job_id, "job id")) if job_id else names.DLQ_SUBJECTS
        async for msg in reader.replay(self.js, names.DLQ_STREAM, subject):
            yield DeadLetter.from_wire(msg.data)

    async def dead_letter(self, job_id: str, task_id: str) -> DeadLetter | None:
        try:
            msg = await self.js.get_last_msg(names.DLQ_STREAM, names.dlq_task_subject(job_id, task_id))
        except NotFoundError:
            return None
        return DeadLetter.from_wire(msg.data or b"")

    async def events(
        self, job_id: str, task_id: str | None = None, *, history: bool = True
    ) -> AsyncIterator[TaskEvent | TaskRecord | JobRecord]:
        """Stream a job's (or one task's) events: state changes, progress, log lines, job summaries."""
        from nats.js import api

        subject = names.task_events_filter(job_id, task_id) if task_id else names.job_events_filter(job_id)
        policy = api.DeliverPolicy.ALL if history else api.DeliverPolicy.NEW
        sub = await self.js.subscribe(
            subject, stream=names.EVENTS_STREAM, ordered_consumer=True, deliver_policy=policy
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                if msg.subject.endswith("." + names.EVENT_JOB):
                    yield JobRecord.from_wire(msg.data)
                elif msg.subject.endswith("." + names.EVENT_STATE):
                    yield TaskRecord.from_wire(msg.data)
                else:
                    yield TaskEvent.from_wire(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _check_encodable(values: list[Any], args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> None:
    """Refuse a sweep before anything is declared if its inputs cannot travel (msgpack)."""
    try:
        msgpack.packb([values, list(args), dict(kwargs or {})], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"task inputs cannot be encoded as msgpack: {exc}") from None
