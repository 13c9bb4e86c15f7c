"""Build the shared wire-protocol test vectors, ``clients/vectors/vectors.json``.

Run ``.venv/bin/python clients/vectors/generate.py`` to rewrite the file, or add ``--check`` to
verify that the committed file is current (exit status 1 if it is not). Every value is fixed (no
clock, no randomness), so the output is reproducible byte for byte with the same msgpack and
zstandard libraries. The format is described in ``clients/PROTOCOL.md``, section "Test vectors":

``valid``
    ``hex`` is exactly ``record.to_wire()``; ``json`` is that body decoded.
``lenient``
    ``hex`` is a body another encoder may legally send (unknown fields, nil optionals, integers
    or float32 for floats, no ``v``, defaults left out); it must decode, and re-encoding the
    result gives ``canonical_hex``.
``invalid``
    ``hex`` must be rejected; the Python decoder's error message contains ``error``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from broker import blobs, codec
from fleet.core.failures import FailureClass
from fleet.core.records import (
    BudgetNotice,
    CancelRequest,
    DeadLetter,
    DoneReport,
    ErrorInfo,
    Fence,
    Heartbeat,
    HeartbeatReply,
    HeldTask,
    JobRecord,
    JobSpec,
    Payload,
    PrioritizeRequest,
    Record,
    Resources,
    RetryPolicy,
    RetryRequest,
    StartedTask,
    StartReport,
    TaskEnvelope,
    TaskEvent,
    TaskRecord,
    TokenGrant,
    TokenRequest,
)
from fleet.core.states import TaskState

OUT = Path(__file__).resolve().parent / "vectors.json"

T0 = 1_700_000_000.0
"""Every timestamp in the vectors is T0 plus a small offset (seconds since the Unix epoch)."""

WORKER = "w-node7-4242-ab12"
DROP = object()
"""Marks a key to remove when deriving an invalid body from a valid one."""


# ---- JSON form --------------------------------------------------------------------------------------
def to_json(value: Any) -> Any:
    """msgpack-decoded value -> JSON value; ``bytes`` (msgpack bin) become ``{"$bin": "<hex>"}``."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"vector maps need str keys, got {k!r}")
            out[k] = to_json(v)
        return out
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"no JSON form for {type(value).__name__}")


# ---- payloads ---------------------------------------------------------------------------------------
def inline(value: Any) -> Payload:
    """The payload the encoder makes for a value that stays inline (mirrors broker.blobs.make_payload)."""
    data, enc, size = codec.encode_value(value)
    if len(data) > blobs.DEFAULT_INLINE_LIMIT:
        raise ValueError("vector payload too large to inline")
    return Payload(enc=enc, size=size, data=data)


def offloaded(value: Any) -> tuple[Payload, bytes]:
    """A payload as stored in the object store: ``(payload with ref, the stored object's bytes)``.

    The real encoder offloads only above the 512 KiB inline limit; the vector uses a small value
    so the file stays small. Decoders must follow a ``ref`` whatever the object's size.
    """
    data, enc, size = codec.encode_value(value)
    return Payload(enc=enc, size=size, ref=codec.content_ref(data)), data


# ---- fixed inputs -----------------------------------------------------------------------------------
MINIMAL_INPUTS: dict[str, Any] = {"args": [3, 4], "kwargs": {}}
COMMAND_INPUTS: dict[str, Any] = {"args": [], "kwargs": {}, "items": ["alpha", 2, {"seed": 7}]}
FULL_INPUTS: dict[str, Any] = {
    "args": ["text", 42, -7, 2.5, True, None, [1, [2, 3]]],
    "kwargs": {
        "blob": b"\x00\x01\xfe\xff",
        "nested": {"k": "v", "ratio": 1.0},
        "big": 2**40,
        "negative": -(2**33),
        "empty": "",
    },
}
ZSTD_INPUTS: dict[str, Any] = {"args": ["fleet " * 1000], "kwargs": {"repeat": 1000}}
OFFLOAD_INPUTS: dict[str, Any] = {"args": [[f"sample-{i:05d}" for i in range(600)]], "kwargs": {}}

MINIMAL = TaskEnvelope(
    task_id="t0000000",
    job_id="j-minimal",
    handler="examples.math:add",
    payload=inline(MINIMAL_INPUTS),
    created_at=T0,
)
COMMAND = TaskEnvelope(
    task_id="t0000001",
    job_id="j-sweep",
    command=["python3", "-m", "sim", "--input", "{item}"],
    payload=inline(COMMAND_INPUTS),
    queue="cpu",
    created_at=T0 + 1,
)
FULL = TaskEnvelope(
    task_id="t0000002",
    job_id="j-sweep",
    handler="examples.sim.models:Model.run",
    payload=inline(FULL_INPUTS),
    tenant="physics",
    queue="gpu",
    priority=9,
    qos="urgent",
    project="climate",
    resources=Resources(cpus=2.5, gpus=1, memory_mb=4096, labels={"gpu": "a100"}),
    limits={"api-x": 2.0},
    retry=RetryPolicy(max_attempts=5, backoff_s=0.5, backoff_max_s=60.0, multiplier=3.0, jitter=0.0),
    timeout_s=120.0,
    idempotency_key="sweep-2023-11-14:t0000002",
    created_at=T0 + 2,
    attempt=2,
    not_before=T0 + 30.5,
    labels={"team": "physics", "run": "42"},
)
ZSTD = TaskEnvelope(
    task_id="t0000003",
    job_id="j-sweep",
    handler="examples.text:count_words",
    payload=inline(ZSTD_INPUTS),
    created_at=T0 + 3,
)
OFFLOAD_PAYLOAD, OFFLOAD_BLOB = offloaded(OFFLOAD_INPUTS)
OFFLOAD = TaskEnvelope(
    task_id="t0000004",
    job_id="j-sweep",
    handler="examples.text:count_words",
    payload=OFFLOAD_PAYLOAD,
    created_at=T0 + 4,
)
ERROR_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "examples/math.py", line 3, in add\n'
    '    raise ValueError("x must be positive")\n'
    "ValueError: x must be positive\n"
)
COMMAND_OUTPUTS: list[Any] = [
    {"exit_code": 0, "stdout": "alpha done\n", "stderr": ""},
    {"exit_code": 0, "stdout": "2 done\n", "stderr": ""},
    {"exit_code": 0, "stdout": '{"seed":7} done\n', "stderr": "warning: slow\n"},
]


# ---- vectors ----------------------------------------------------------------------------------------
def valid(
    name: str,
    description: str,
    record: Record,
    *,
    payload_path: list[str] | None = None,
    payload_value: Any = None,
    blob: bytes | None = None,
) -> dict[str, Any]:
    wire = record.to_wire()
    if type(record).from_wire(wire) != record:
        raise AssertionError(f"{name}: does not round-trip")
    vector: dict[str, Any] = {
        "name": name,
        "kind": "valid",
        "record": type(record).__name__,
        "description": description,
        "hex": wire.hex(),
        "json": to_json(codec.unpack(wire)),
    }
    if payload_path is not None:
        vector["payload_path"] = payload_path
        vector["payload_value"] = to_json(payload_value)
    if blob is not None:
        vector["blob_hex"] = blob.hex()
    return vector


def lenient(
    name: str, description: str, cls: type[Record], body: dict[str, Any], *, single_float: bool = False
) -> dict[str, Any]:
    wire = msgpack.packb(body, use_bin_type=True, use_single_float=single_float)
    canonical = cls.from_wire(wire).to_wire()
    return {
        "name": name,
        "kind": "lenient",
        "record": cls.__name__,
        "description": description,
        "hex": wire.hex(),
        "json": to_json(codec.unpack(wire)),
        "canonical_hex": canonical.hex(),
    }


def invalid(
    name: str, description: str, cls: type[Record], wire: bytes, error: str, *, known_gap: str | None = None
) -> dict[str, Any]:
    vector: dict[str, Any] = {
        "name": name,
        "kind": "invalid",
        "record": cls.__name__,
        "description": description,
        "hex": wire.hex(),
        "error": error,
    }
    if known_gap is not None:
        vector["known_gap"] = known_gap
    return vector


def body(record: Record, **changes: Any) -> dict[str, Any]:
    """The decoded body of ``record`` with top-level keys replaced (or removed with ``DROP``)."""
    out = codec.unpack(record.to_wire())
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def bad(record: Record, **changes: Any) -> bytes:
    return codec.pack(body(record, **changes))


def valid_vectors() -> list[dict[str, Any]]:
    return [
        valid(
            "envelope-minimal",
            "A handler task with two small positional arguments; every optional field left out.",
            MINIMAL,
            payload_path=["payload"],
            payload_value=MINIMAL_INPUTS,
        ),
        valid(
            "envelope-command-items",
            "A command (argv) task bundling three items; {item} in argv is replaced per item.",
            COMMAND,
            payload_path=["payload"],
            payload_value=COMMAND_INPUTS,
        ),
        valid(
            "envelope-all-fields",
            "Every optional field set; arguments mix str, bin, ints beyond 32 bits, floats, nil, bool.",
            FULL,
            payload_path=["payload"],
            payload_value=FULL_INPUTS,
        ),
        valid(
            "envelope-zstd",
            "Arguments over 4096 bytes of msgpack: the payload is one zstd frame (enc msgpack+zstd).",
            ZSTD,
            payload_path=["payload"],
            payload_value=ZSTD_INPUTS,
        ),
        valid(
            "envelope-offloaded",
            "The payload lives in the fleet_blobs object store under its sha256 ref; blob_hex is "
            "the stored object (small here; real offloads are over 512 KiB).",
            OFFLOAD,
            payload_path=["payload"],
            payload_value=OFFLOAD_INPUTS,
            blob=OFFLOAD_BLOB,
        ),
        valid(
            "jobspec",
            "A job declaration announcing three tasks on queue cpu.",
            JobSpec(
                job_id="j-sweep",
                name="parameter sweep",
                queue="cpu",
                total=3,
                created_at=T0,
                labels={"team": "physics"},
            ),
        ),
        valid(
            "jobspec-minimal",
            "A job declaration with only the required fields (total unknown).",
            JobSpec(job_id="j-minimal", created_at=T0),
        ),
        valid(
            "cancel-job",
            "Cancel a whole job.",
            CancelRequest(job_id="j-sweep", at=T0 + 60),
        ),
        valid(
            "cancel-task",
            "Cancel one task of a job, with a reason.",
            CancelRequest(job_id="j-sweep", task_id="t0000001", reason="superseded by j-sweep2", at=T0 + 61),
        ),
        valid(
            "start-report",
            "A worker started two deliveries fetched in one batch.",
            StartReport(
                worker_id=WORKER,
                at=T0 + 5,
                tasks=[
                    StartedTask(task_id="t0000000", job_id="j-minimal", attempt=1, delivery=1, token=17001),
                    StartedTask(task_id="t0000001", job_id="j-sweep", attempt=2, delivery=3, token=18003),
                ],
            ),
        ),
        valid(
            "done-succeeded",
            "A successful attempt; the result value is the integer 7.",
            DoneReport(
                task_id="t0000000",
                job_id="j-minimal",
                attempt=1,
                delivery=1,
                token=17001,
                worker_id=WORKER,
                outcome="succeeded",
                result=inline(7),
                started_at=T0 + 5,
                finished_at=T0 + 5.25,
            ),
            payload_path=["result"],
            payload_value=7,
        ),
        valid(
            "done-succeeded-items",
            "A successful command task with items: the result is one output map per item.",
            DoneReport(
                task_id="t0000001",
                job_id="j-sweep",
                attempt=2,
                delivery=3,
                token=18003,
                worker_id=WORKER,
                outcome="succeeded",
                result=inline(COMMAND_OUTPUTS),
                started_at=T0 + 5,
                finished_at=T0 + 9.5,
            ),
            payload_path=["result"],
            payload_value=COMMAND_OUTPUTS,
        ),
        valid(
            "done-failed",
            "A failed attempt: the error, its failure class and the delay the handler asked for.",
            DoneReport(
                task_id="t0000000",
                job_id="j-minimal",
                attempt=1,
                delivery=1,
                token=17001,
                worker_id=WORKER,
                outcome="failed",
                error=ErrorInfo(
                    type="ValueError",
                    message="x must be positive",
                    traceback=ERROR_TRACEBACK,
                    retryable=True,
                    failure=FailureClass.ERROR,
                    retry_after_s=2.5,
                ),
                started_at=T0 + 5,
                finished_at=T0 + 5.5,
            ),
        ),
        valid(
            "done-cancelled",
            "An attempt stopped by a cancel request.",
            DoneReport(
                task_id="t0000001",
                job_id="j-sweep",
                attempt=1,
                delivery=1,
                token=19001,
                worker_id=WORKER,
                outcome="cancelled",
                error=ErrorInfo(type="Cancelled", message="cancelled by user", retryable=False),
                started_at=T0 + 5,
                finished_at=T0 + 60.5,
            ),
        ),
        valid(
            "task-record-running",
            "A task's state of record (fleet.state.<job>.<task>): running on a worker under a token.",
            TaskRecord(
                job_id="j-minimal",
                task_id="t0000000",
                state=TaskState.RUNNING,
                rev=3,
                at=T0 + 5,
                attempt=1,
                dispatch=1,
                seq=17,
                token=17001,
                worker_id=WORKER,
                intake_seq=2,
            ),
        ),
        valid(
            "task-record-dispatched-placed",
            "A GPU task released from the waiting room and placed on the worker that has its GPUs.",
            TaskRecord(
                job_id="j-sweep",
                task_id="t0000003",
                state=TaskState.DISPATCHED,
                rev=1,
                at=T0 + 5.2,
                queue="gpu",
                dispatch=1,
                seq=19,
                intake_seq=5,
                priority=7,
                resources=Resources(cpus=4, gpus=1, memory_mb=16000, labels={"gpu": "a100"}),
                limits={"api-x": 1.0},
                placed=WORKER,
            ),
        ),
        valid(
            "task-record-retrying",
            "A task waiting out its backoff after a failure of class error.",
            TaskRecord(
                job_id="j-sweep",
                task_id="t0000002",
                state=TaskState.RETRYING,
                rev=5,
                at=T0 + 5.5,
                queue="gpu",
                attempt=3,
                dispatch=2,
                seq=18,
                reason="ValueError: x must be positive [error] (retry in 1.0s)",
                failure=FailureClass.ERROR,
                lost=1,
                not_before=T0 + 6.5,
                intake_seq=4,
                retry=RetryPolicy(
                    max_attempts=5, backoff_s=0.5, backoff_max_s=60.0, multiplier=3.0, jitter=0.0
                ),
            ),
        ),
        valid(
            "event-progress",
            "A progress event (fraction 0.0-1.0 and a message).",
            TaskEvent(
                kind="progress",
                job_id="j-sweep",
                task_id="t0000001",
                at=T0 + 7,
                attempt=2,
                token=18003,
                progress=0.5,
                message="1/2 items",
            ),
        ),
        valid(
            "event-log",
            "A log line from a running handler.",
            TaskEvent(
                kind="log",
                job_id="j-sweep",
                task_id="t0000001",
                at=T0 + 7.125,
                attempt=2,
                level="info",
                message="seed 7",
            ),
        ),
        valid(
            "job-record",
            "A job summary while the job runs (fleet_jobs KV value and fleet.event.<job>.job body).",
            JobRecord(
                job_id="j-sweep",
                name="parameter sweep",
                queue="cpu",
                total=3,
                submitted=3,
                counts={"queued": 1, "running": 1, "succeeded": 1},
                retries=1,
                stale_reports=1,
                created_at=T0,
                updated_at=T0 + 9.5,
            ),
        ),
        valid(
            "job-record-finished",
            "A cancelled job whose tasks have all reached a terminal state.",
            JobRecord(
                job_id="j-minimal",
                total=1,
                submitted=1,
                counts={"cancelled": 1},
                failures={},
                requeues=2,
                created_at=T0,
                updated_at=T0 + 61,
                finished_at=T0 + 61,
                cancelled=True,
            ),
        ),
        valid(
            "heartbeat",
            "Worker liveness: one of four slots busy.",
            Heartbeat(
                worker_id=WORKER,
                queue="cpu",
                host="node7",
                pid=4242,
                slots=4,
                busy=1,
                held=[HeldTask(job_id="j-sweep", task_id="t0000001", token=18003)],
                at=T0 + 6,
                interval_s=1.0,
            ),
        ),
        valid(
            "heartbeat-reply",
            "The scheduler's answer: stop a delivery whose task another delivery now holds.",
            HeartbeatReply(
                fence=[
                    Fence(
                        job_id="j-sweep",
                        task_id="t0000001",
                        token=18003,
                        reason="superseded by a newer dispatch",
                        ack=True,
                    )
                ],
                confirmed=[21002],
            ),
        ),
        valid(
            "retry-request",
            "Re-run a job's tasks that failed on the network or lost their lease, dead ones included.",
            RetryRequest(
                job_id="j-sweep",
                request_id="r-0123456789ab",
                failures=[FailureClass.INFRA, FailureClass.LOST],
                include_dead=True,
                at=T0 + 90,
            ),
        ),
        valid(
            "prioritize-job",
            "Make every waiting task of a job (and its later ones) priority 9 in the urgent class.",
            PrioritizeRequest(
                job_id="j-sweep", request_id="p-0123456789ab", priority=9, qos="urgent", at=T0 + 95
            ),
        ),
        valid(
            "prioritize-tasks",
            "Lower two waiting tasks of a job to priority 1.",
            PrioritizeRequest(
                job_id="j-sweep",
                request_id="p-0123456789ac",
                priority=1,
                task_ids=["t0000001", "t0000002"],
                at=T0 + 96,
            ),
        ),
        valid(
            "token-request",
            "A worker's handlers want 25 tokens of the limiter api-x.",
            TokenRequest(limiter="api-x", want=25.0, worker_id=WORKER),
        ),
        valid(
            "token-request-throttled",
            "A handler got HTTP 429 with Retry-After: 30 (the limiter slows down for everyone).",
            TokenRequest(limiter="api-x", want=1.0, worker_id=WORKER, throttled=True, retry_after_s=30.0),
        ),
        valid(
            "token-grant",
            "The scheduler leases 20 tokens, usable for 2 seconds.",
            TokenGrant(limiter="api-x", granted=20.0, lease_s=2.0),
        ),
        valid(
            "token-grant-none",
            "No tokens now: ask again in 0.15 s.",
            TokenGrant(limiter="api-x", granted=0.0, lease_s=2.0, retry_in_s=0.15),
        ),
        valid(
            "budget-notice",
            "Tenant lab-a used 1,000 of its 1,000 CPU-hours: its new work is held (on_budget: hold).",
            BudgetNotice(
                tenant="lab-a",
                resource="cpu-hours",
                used=1000.4,
                limit=1000.0,
                threshold=1.0,
                held=True,
                at=T0 + 97,
                message="tenant lab-a reached its cpu-hours budget (1000.4/1000): new work is held",
            ),
        ),
        valid(
            "dead-letter",
            "A submission the scheduler could not admit, kept with its raw bytes.",
            DeadLetter(
                origin="intake",
                subject="fleet.intake.task.j-bad.t0000000",
                reason="TaskEnvelope: created_at: Field required",
                at=T0 + 8,
                job_id="j-bad",
                task_id="t0000000",
                raw=codec.pack({"v": 1, "job_id": "j-bad", "task_id": "t0000000"}),
            ),
        ),
    ]


def lenient_vectors() -> list[dict[str, Any]]:
    payload = codec.unpack(MINIMAL.to_wire())["payload"]
    return [
        lenient(
            "envelope-lenient",
            "No v (defaults to 1), an integer created_at, a nil optional field, unknown fields at the "
            "top level and inside nested maps, and defaults left out: all must be accepted.",
            TaskEnvelope,
            {
                "task_id": "t0000009",
                "job_id": "j-lenient",
                "handler": "pkg.mod:fn",
                "payload": {**payload, "zz_future": True},
                "created_at": int(T0),
                "timeout_s": None,
                "retry": {"max_attempts": 5, "zz_future": "x"},
                "zz_future_field": {"nested": [1, 2]},
            },
        ),
        lenient(
            "done-lenient",
            "A report from a newer worker in another language: floats encoded as float32, an "
            "unknown field at the top level and one inside error, and an out-of-range retry delay "
            "(cut to the 7-day maximum).",
            DoneReport,
            {
                "v": 1,
                "task_id": "t0000000",
                "job_id": "j-minimal",
                "attempt": 1,
                "delivery": 1,
                "token": 17001,
                "worker_id": WORKER,
                "outcome": "failed",
                "error": {"type": "OSError", "message": "disk full", "errno": 28, "retry_after_s": 1e30},
                "started_at": T0,
                "finished_at": T0 + 128,  # float32 holds multiples of 128 exactly near T0
                "host_metrics": {"rss_mb": 512},
            },
            single_float=True,
        ),
    ]


def invalid_vectors() -> list[dict[str, Any]]:
    payload = codec.unpack(MINIMAL.to_wire())["payload"]
    truncated = MINIMAL.to_wire()[:-3]
    bad_utf8 = b"\x82\xa1v\x01\xa6job_id\xa2\xff\xfe"  # {"v": 1, "job_id": <str with invalid UTF-8>}
    return [
        invalid(
            "invalid-not-msgpack",
            "0xc1 is never used in msgpack.",
            TaskEnvelope,
            b"\xc1",
            "body is not valid msgpack",
        ),
        invalid(
            "invalid-truncated",
            "A valid envelope with its last three bytes cut off.",
            TaskEnvelope,
            truncated,
            "body is not valid msgpack",
        ),
        invalid(
            "invalid-not-a-map",
            "The body is a msgpack array, not a map.",
            TaskEnvelope,
            msgpack.packb(["t0000000", "j-minimal"]),
            "body must be a msgpack map",
        ),
        invalid(
            "invalid-str-not-utf8",
            "A str (not bin) whose bytes are not UTF-8.",
            JobSpec,
            bad_utf8,
            "body is not valid msgpack",
        ),
        invalid(
            "invalid-priority-type",
            "priority is a string, not an integer.",
            TaskEnvelope,
            bad(MINIMAL, priority="high"),
            "priority: Input should be a valid integer",
        ),
        invalid(
            "invalid-priority-range",
            "priority is outside 0-9.",
            TaskEnvelope,
            bad(MINIMAL, priority=10),
            "priority: Input should be less than or equal to 9",
        ),
        invalid(
            "invalid-missing-created-at",
            "The required field created_at is missing.",
            TaskEnvelope,
            bad(MINIMAL, created_at=DROP),
            "created_at: Field required",
        ),
        invalid(
            "invalid-handler-form",
            "handler is not of the form module:function.",
            TaskEnvelope,
            bad(MINIMAL, handler="examples.math.add"),
            "is not of the form 'package.module:function'",
        ),
        invalid(
            "invalid-handler-and-command",
            "Both handler and command are set.",
            TaskEnvelope,
            bad(MINIMAL, command=["true"]),
            "exactly one of handler or command is required",
        ),
        invalid(
            "invalid-empty-command",
            "command is an empty argv list.",
            TaskEnvelope,
            bad(MINIMAL, handler=DROP, command=[]),
            "command must be a non-empty argv list",
        ),
        invalid(
            "invalid-version-2",
            "A protocol version this build does not speak.",
            TaskEnvelope,
            bad(MINIMAL, v=2),
            "unsupported protocol version 2",
        ),
        invalid(
            "invalid-job-id-token",
            "job_id contains a space (not a valid subject token).",
            TaskEnvelope,
            bad(MINIMAL, job_id="my job"),
            "job_id: Value error, invalid identifier",
        ),
        invalid(
            "invalid-payload-two-sources",
            "The payload carries both data and ref.",
            TaskEnvelope,
            bad(MINIMAL, payload={**payload, "ref": codec.content_ref(payload["data"])}),
            "payload needs exactly one of data or ref",
        ),
        invalid(
            "invalid-payload-enc",
            "An unknown payload encoding.",
            TaskEnvelope,
            bad(MINIMAL, payload={**payload, "enc": "gzip"}),
            "payload.enc: Input should be 'msgpack' or 'msgpack+zstd'",
        ),
        invalid(
            "invalid-done-outcome",
            "outcome is not one of succeeded, failed, cancelled.",
            DoneReport,
            codec.pack(
                {
                    "v": 1,
                    "task_id": "t0000000",
                    "job_id": "j-minimal",
                    "attempt": 1,
                    "delivery": 1,
                    "token": 17001,
                    "worker_id": WORKER,
                    "outcome": "ok",
                    "started_at": T0,
                    "finished_at": T0 + 1,
                }
            ),
            "outcome: Input should be 'succeeded', 'failed' or 'cancelled'",
        ),
        invalid(
            "invalid-cancel-missing-job",
            "A cancel request without job_id.",
            CancelRequest,
            codec.pack({"v": 1, "at": T0}),
            "job_id: Field required",
        ),
        invalid(
            "invalid-job-id-trailing-newline",
            "job_id ends with a newline (not a valid subject token).",
            TaskEnvelope,
            bad(MINIMAL, job_id="j-minimal\n"),
            "invalid identifier",
        ),
        invalid(
            "invalid-not-before-infinite",
            "not_before is infinite (times from outside must be finite and before 2200).",
            TaskEnvelope,
            bad(MINIMAL, not_before=float("inf")),
            "not_before",
        ),
        invalid(
            "invalid-failure-class",
            "A failure class this build does not know.",
            RetryRequest,
            codec.pack(
                {"v": 1, "job_id": "j-sweep", "request_id": "r-1", "failures": ["cosmic-ray"], "at": T0}
            ),
            "failures.0: Input should be",
        ),
        invalid(
            "invalid-payload-data-as-str",
            "Payload data sent as msgpack str instead of bin.",
            TaskEnvelope,
            bad(MINIMAL, payload={**payload, "data": "\x92\x03\x04"}),
            "payload.data",
        ),
    ]


def build() -> list[dict[str, Any]]:
    """Every vector, in file order."""
    return valid_vectors() + lenient_vectors() + invalid_vectors()


def render(vectors: list[dict[str, Any]]) -> str:
    """The exact text of vectors.json."""
    return json.dumps(vectors, indent=2) + "\n"


def main(argv: list[str], write: Callable[[str], object] = sys.stdout.write) -> int:
    vectors = build()
    text = render(vectors)
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            write(f"{OUT} is stale: run clients/vectors/generate.py\n")
            return 1
        write(f"{OUT} is current\n")
        return 0
    OUT.write_text(text, encoding="utf-8")
    write(f"wrote {len(vectors)} vectors to {OUT}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
