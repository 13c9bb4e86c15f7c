"""Wire records: validation, error messages naming the field, msgpack round trips."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker import codec
from fleet.core import fencing
from fleet.core.failures import FailureClass
from fleet.core.records import (
    LATEST_TIME,
    MAX_DELAY_S,
    PROTOCOL_VERSION,
    CancelRequest,
    DeadLetter,
    DoneReport,
    ErrorInfo,
    Fence,
    Heartbeat,
    HeartbeatReply,
    HeldTask,
    InvalidRecord,
    JobRecord,
    JobSpec,
    Payload,
    Record,
    RetryPolicy,
    RetryRequest,
    StartedTask,
    StartReport,
    TaskEnvelope,
    TaskEvent,
    TaskRecord,
    parse,
)
from fleet.core.states import TaskState

FAST = settings(max_examples=40, deadline=None)


def base(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "job_id": "job-1",
        "task_id": "task-1",
        "handler": "pkg.mod:func",
        "payload": {"enc": "msgpack", "size": 1, "data": b"\xc0"},
        "created_at": 1000.0,
    }
    obj.update(overrides)
    return {k: v for k, v in obj.items() if v is not _DROP}


_DROP: Any = object()


def bad(cls: type[Record], obj: dict[str, Any]) -> str:
    with pytest.raises(InvalidRecord) as info:
        parse(cls, obj)
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}: ")
    return msg


def _sample_records() -> list[Record]:
    env = parse(TaskEnvelope, base())
    return [
        env,
        JobSpec(job_id="j", name="nightly", total=10, created_at=1.0, labels={"a": "b"}),
        CancelRequest(job_id="j", task_id="t", at=2.0),
        CancelRequest(job_id="j", at=2.0, reason="enough"),
        RetryRequest(job_id="j", request_id="r1", at=2.5),
        RetryRequest(
            job_id="j",
            request_id="r2",
            failures=[FailureClass.TIMEOUT, FailureClass.LOST],
            include_dead=True,
            task_ids=["t", "u"],
            at=2.5,
        ),
        StartReport(
            worker_id="w1",
            at=3.0,
            tasks=[StartedTask(task_id="t", job_id="j", attempt=1, delivery=2, token=fencing.make(7, 2))],
        ),
        DoneReport(
            task_id="t",
            job_id="j",
            attempt=1,
            delivery=1,
            token=fencing.make(7, 1),
            worker_id="w1",
            outcome="failed",
            error=ErrorInfo(
                type="ValueError",
                message="bad",
                traceback="tb",
                retryable=False,
                failure=FailureClass.TIMEOUT,
                retry_after_s=2.5,
            ),
            started_at=3.0,
            finished_at=4.0,
        ),
        DoneReport(
            task_id="t",
            job_id="j",
            attempt=2,
            delivery=1,
            token=fencing.make(9, 1),
            worker_id="w1",
            outcome="succeeded",
            result=Payload(size=3, data=b"\x93\x01\x02\x03"),
            items=3,
            started_at=3.0,
            finished_at=4.0,
        ),
        TaskEvent(kind="progress", job_id="j", task_id="t", at=5.0, progress=0.5, message="half", token=7001),
        TaskEvent(kind="log", job_id="j", task_id="t", at=5.0, message="hello", level="info", attempt=1),
        TaskRecord(job_id="j", task_id="t", state=TaskState.QUEUED, rev=1, at=5.0, dispatch=1, seq=7),
        TaskRecord(
            job_id="j",
            task_id="t",
            state=TaskState.RETRYING,
            rev=4,
            at=5.5,
            queue="gpu",
            attempt=2,
            dispatch=3,
            seq=12,
            token=fencing.make(12, 2),
            worker_id="w1",
            reason="boom",
            failure=FailureClass.INFRA,
            lost=1,
            infra=2,
            preempted=3,
            not_before=9.0,
            intake_seq=4,
            blobs=["j/sha256:" + "0" * 64],
            retry=RetryPolicy(max_attempts=5, max_lost_leases=2),
        ),
        JobRecord(
            job_id="j",
            total=2,
            submitted=2,
            counts={"succeeded": 1, "failed": 1},
            failures={"timeout": 1},
            retries=2,
            requeues=1,
            stale_reports=3,
            created_at=1.0,
            updated_at=6.0,
            finished_at=6.0,
            retried_at=5.0,
        ),
        Heartbeat(
            worker_id="w1",
            queue="q",
            host="h",
            pid=1,
            slots=4,
            busy=1,
            held=[HeldTask(job_id="j", task_id="t", token=7001)],
            at=7.0,
            interval_s=1.0,
        ),
        HeartbeatReply(
            fence=[Fence(job_id="j", task_id="t", token=7001, reason="already succeeded", ack=True)],
            known=False,
        ),
        HeartbeatReply(),
        DeadLetter(origin="intake", subject="fleet.intake.task.j.t", reason="bad", at=8.0, raw=b"\xc1\x00"),
        DeadLetter(
            origin="task",
            subject="fleet.state.j.t",
            reason="poison",
            at=8.0,
            job_id="j",
            task_id="t",
            failure=FailureClass.LOST,
            attempt=2,
        ),
    ]


# ---- TaskEnvelope -----------------------------------------------------------------------------------
def test_minimal_envelope_and_defaults() -> None:
    env = parse(TaskEnvelope, base())
    assert env.v == PROTOCOL_VERSION == 1
    assert (env.tenant, env.queue, env.priority, env.attempt) == ("default", "default", 5, 1)
    assert env.command is None
    assert env.not_before is None
    assert env.retry == RetryPolicy()
    assert env.retry.max_attempts == 3
    assert env.labels == {}


def test_command_envelope() -> None:
    env = parse(TaskEnvelope, base(handler=_DROP, command=["echo", "{item}"]))
    assert env.handler is None
    assert env.command == ["echo", "{item}"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"handler": _DROP},
        {"handler": None},
        {"handler": "m:f", "command": ["echo"]},
        {"handler": _DROP, "command": None},
    ],
)
def test_exactly_one_of_handler_or_command(overrides: dict[str, Any]) -> None:
    assert "exactly one of handler or command is required" in bad(TaskEnvelope, base(**overrides))


def test_command_must_be_non_empty() -> None:
    assert "command must be a non-empty argv list" in bad(TaskEnvelope, base(handler=_DROP, command=[]))


def test_command_must_be_strings() -> None:
    assert "command.0" in bad(TaskEnvelope, base(handler=_DROP, command=[1, "x"]))


@pytest.mark.parametrize("handler", ["m:f", "pkg.mod:func", "_m:_f", "a.b.c:Cls.method", "M1:f2"])
def test_handler_format_accepted(handler: str) -> None:
    assert parse(TaskEnvelope, base(handler=handler)).handler == handler


@pytest.mark.parametrize(
    "handler",
    ["nocolon", "a:b:c", "1mod:f", "mod:", ":f", "mod:f-x", "a b:c", "mod:1f", "", "m/x:f", "m:f()"],
)
def test_handler_format_rejected(handler: str) -> None:
    msg = bad(TaskEnvelope, base(handler=handler))
    assert f"handler {handler!r} is not of the form 'package.module:function'" in msg


def test_handler_with_trailing_newline_rejected() -> None:
    assert "is not of the form" in bad(TaskEnvelope, base(handler="mod:func\n"))


@pytest.mark.parametrize("priority", [0, 5, 9])
def test_priority_in_bounds(priority: int) -> None:
    assert parse(TaskEnvelope, base(priority=priority)).priority == priority


@pytest.mark.parametrize("priority", [-1, 10, 100])
def test_priority_out_of_bounds(priority: int) -> None:
    assert bad(TaskEnvelope, base(priority=priority)).startswith("TaskEnvelope: priority: ")


@pytest.mark.parametrize("field", ["task_id", "job_id", "tenant", "queue"])
@pytest.mark.parametrize("value", ["a.b", "", "sp ace", "x*", "x>", "x" * 129, "a:b"])
def test_token_fields_rejected(field: str, value: str) -> None:
    msg = bad(TaskEnvelope, base(**{field: value}))
    assert msg.startswith(f"TaskEnvelope: {field}: ")
    assert "invalid identifier" in msg


@pytest.mark.parametrize("field", ["task_id", "job_id", "queue"])
def test_token_fields_reject_trailing_newline(field: str) -> None:
    msg = bad(TaskEnvelope, base(**{field: "x\n"}))
    assert msg.startswith(f"TaskEnvelope: {field}: ")


@pytest.mark.parametrize("field", ["task_id", "job_id", "tenant", "queue"])
def test_token_fields_accept_tokens(field: str) -> None:
    assert getattr(parse(TaskEnvelope, base(**{field: "A-z_09"})), field) == "A-z_09"


@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_protocol_versions_rejected(version: int) -> None:
    msg = bad(TaskEnvelope, base(v=version))
    assert f"unsupported protocol version {version}" in msg
    assert f"this build speaks {PROTOCOL_VERSION}" in msg


@pytest.mark.parametrize("record", _sample_records(), ids=lambda r: type(r).__name__)
def test_version_checked_on_every_record(record: Record) -> None:
    obj = {**record.model_dump(), "v": 2}
    with pytest.raises(InvalidRecord, match="unsupported protocol version 2"):
        parse(type(record), obj)
    with pytest.raises(InvalidRecord, match="unsupported protocol version 2"):
        type(record).from_wire(codec.pack(obj))


def test_unknown_fields_ignored() -> None:
    env = parse(TaskEnvelope, base(future_field={"x": 1}, another=[1, 2]))
    assert not hasattr(env, "future_field")
    assert "future_field" not in env.model_dump()
    assert codec.unpack(env.to_wire()).keys().isdisjoint({"future_field", "another"})


@pytest.mark.parametrize("field", ["job_id", "task_id", "payload", "created_at"])
def test_missing_required_field_named(field: str) -> None:
    msg = bad(TaskEnvelope, base(**{field: _DROP}))
    assert f"{field}: Field required" in msg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": float("nan")}, "created_at"),
        ({"created_at": -1.0}, "created_at"),
        ({"not_before": LATEST_TIME + 1}, "not_before"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"attempt": 0}, "attempt"),
        ({"idempotency_key": "k" * 257}, "idempotency_key"),
        ({"labels": {"a": 1}}, "labels.a"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"retry": {"jitter": 1.5}}, "retry.jitter"),
        ({"retry": {"multiplier": 0.5}}, "retry.multiplier"),
        ({"resources": {"gpus": -1}}, "resources.gpus"),
        ({"payload": {"size": -1, "data": b""}}, "payload.size"),
        ({"payload": {"size": 1, "data": b"x", "enc": "gzip"}}, "payload.enc"),
    ],
)
def test_invalid_record_names_the_field(overrides: dict[str, Any], field: str) -> None:
    assert bad(TaskEnvelope, base(**overrides)).startswith(f"TaskEnvelope: {field}: ")


def test_payload_needs_exactly_one_source() -> None:
    assert "payload needs exactly one of data or ref" in bad(TaskEnvelope, base(payload={"size": 1}))
    both = {"size": 1, "data": b"x", "ref": REF}
    assert "payload needs exactly one of data or ref" in bad(TaskEnvelope, base(payload=both))
    ref = parse(TaskEnvelope, base(payload={"enc": "msgpack+zstd", "size": 10, "ref": REF}))
    assert ref.payload.ref == REF
    assert ref.payload.data is None


REF = codec.content_ref(b"blob")


@pytest.mark.parametrize("ref", ["sha256:ab", "sha256:" + "A" * 64, "md5:" + "0" * 64, REF + "0", REF + "\n"])
def test_payload_ref_must_be_a_content_address(ref: str) -> None:
    assert bad(TaskEnvelope, base(payload={"size": 1, "ref": ref})).startswith("TaskEnvelope: payload.ref: ")


@pytest.mark.parametrize("data", ["text", 5, [1]])
def test_payload_data_must_be_bytes(data: Any) -> None:
    assert bad(TaskEnvelope, base(payload={"size": 1, "data": data})).startswith(
        "TaskEnvelope: payload.data: "
    )


def test_many_errors_are_summarised() -> None:
    msg = bad(TaskEnvelope, {"v": 1, "priority": 99, "attempt": 0})
    # task_id, job_id, payload, created_at missing + priority + attempt = 6 errors: 5 shown
    assert msg.endswith("(+1 more)")
    assert msg.count("Field required") == 4


def test_records_are_frozen() -> None:
    env = parse(TaskEnvelope, base())
    with pytest.raises(ValidationError):
        env.priority = 1  # type: ignore[misc]


# ---- wire form --------------------------------------------------------------------------------------
def test_envelope_wire_round_trip() -> None:
    env = parse(
        TaskEnvelope,
        base(
            priority=9,
            labels={"team": "a"},
            timeout_s=2.5,
            not_before=123.0,
            attempt=3,
            idempotency_key="k1",
            resources={"cpus": 0.5, "gpus": 1, "memory_mb": 512},
            retry={"max_attempts": 5, "backoff_s": 0.5, "jitter": 0.0},
        ),
    )
    wire = env.to_wire()
    assert TaskEnvelope.from_wire(wire) == env
    body = codec.unpack(wire)
    assert body["v"] == 1
    assert body["payload"]["data"] == b"\xc0"


def test_to_wire_omits_none() -> None:
    body = codec.unpack(parse(TaskEnvelope, base()).to_wire())
    for absent in ("command", "timeout_s", "not_before", "idempotency_key"):
        assert absent not in body
    assert "ref" not in body["payload"]


def test_from_wire_garbage_raises_decode_error() -> None:
    with pytest.raises(codec.DecodeError):
        TaskEnvelope.from_wire(b"\xc1")
    with pytest.raises(codec.DecodeError, match="must be a msgpack map"):
        TaskEnvelope.from_wire(msgpack.packb([1, 2]))


def test_from_wire_invalid_record() -> None:
    with pytest.raises(InvalidRecord, match="priority"):
        TaskEnvelope.from_wire(codec.pack(base(priority=42)))
    # both are ValueErrors, which is what the scheduler catches
    assert issubclass(InvalidRecord, ValueError)
    assert issubclass(codec.DecodeError, ValueError)


envelopes = st.builds(
    lambda job, task, prio, attempt, cmd, labels, nb: parse(
        TaskEnvelope,
        base(
            job_id=job,
            task_id=task,
            priority=prio,
            attempt=attempt,
            labels=labels,
            not_before=nb,
            **({"handler": _DROP, "command": cmd} if cmd else {}),
        ),
    ),
    st.text("abcXYZ019_-", min_size=1, max_size=10),
    st.text("abcXYZ019_-", min_size=1, max_size=10),
    st.integers(0, 9),
    st.integers(1, 50),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.none() | st.floats(0, LATEST_TIME),
)


@FAST
@given(envelopes)
def test_envelope_round_trip_property(env: TaskEnvelope) -> None:
    assert TaskEnvelope.from_wire(env.to_wire()) == env


@pytest.mark.parametrize("record", _sample_records(), ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record: Record) -> None:
    again = type(record).from_wire(record.to_wire())
    assert again == record


def test_task_record_enums_decode_as_enums() -> None:
    rec = TaskRecord(job_id="j", task_id="t", state=TaskState.DEAD, rev=1, at=1.0, failure=FailureClass.LOST)
    body = codec.unpack(rec.to_wire())
    assert (body["state"], body["failure"]) == ("dead", "lost")
    again = TaskRecord.from_wire(rec.to_wire())
    assert again.state is TaskState.DEAD
    assert again.failure is FailureClass.LOST


def test_task_record_defaults_and_limits() -> None:
    rec = TaskRecord(job_id="j", task_id="t", state=TaskState.QUEUED, rev=1, at=1.0)
    assert (rec.attempt, rec.dispatch, rec.seq, rec.token, rec.worker_id) == (1, 0, None, None, None)
    assert (rec.lost, rec.infra, rec.preempted, rec.blobs, rec.retry) == (0, 0, 0, [], None)
    body = {"job_id": "j", "task_id": "t", "state": "queued", "at": 1.0}
    assert bad(TaskRecord, {**body, "rev": 0}).startswith("TaskRecord: rev: ")
    assert bad(TaskRecord, {**body, "rev": 1, "state": "paused"}).startswith("TaskRecord: state: ")
    assert bad(TaskRecord, {**body, "rev": 1, "task_id": "a.b"}).startswith("TaskRecord: task_id: ")
    assert bad(TaskRecord, {**body, "rev": 1, "at": float("inf")}).startswith("TaskRecord: at: ")


def test_done_report_outcome_checked() -> None:
    obj = {
        "task_id": "t",
        "job_id": "j",
        "attempt": 1,
        "delivery": 1,
        "token": 1001,
        "worker_id": "w",
        "outcome": "exploded",
        "started_at": 0,
        "finished_at": 0,
    }
    assert bad(DoneReport, obj).startswith("DoneReport: outcome: ")


@pytest.mark.parametrize("record", [DoneReport, StartedTask, HeldTask])
def test_reports_need_a_token(record: type[Any]) -> None:
    obj: dict[str, Any] = {
        "task_id": "t",
        "job_id": "j",
        "attempt": 1,
        "delivery": 1,
        "worker_id": "w",
        "outcome": "succeeded",
        "started_at": 0,
        "finished_at": 0,
    }
    with pytest.raises(ValidationError, match="token"):
        record.model_validate(obj)
    with pytest.raises(ValidationError, match="token"):
        record.model_validate({**obj, "token": -1})
    assert record.model_validate({**obj, "token": 1001}).token == 1001


def test_done_report_has_no_envelope() -> None:
    obj = {
        "task_id": "t",
        "job_id": "j",
        "attempt": 1,
        "delivery": 1,
        "token": 1001,
        "worker_id": "w",
        "outcome": "succeeded",
        "started_at": 0,
        "finished_at": 0,
        "envelope": base(),
    }
    report = parse(DoneReport, obj)
    assert "envelope" not in report.model_dump()
    assert "envelope" not in codec.unpack(report.to_wire())


def test_error_info_defaults_to_a_retryable_error() -> None:
    err = ErrorInfo(type="E", message="m")
    assert (err.failure, err.retryable, err.retry_after_s) == (FailureClass.ERROR, True, None)


@pytest.mark.parametrize(
    ("given_s", "kept_s"),
    [(2.5, 2.5), (0, 0.0), (-3, 0.0), (float("nan"), 0.0), (1e12, MAX_DELAY_S), (float("inf"), MAX_DELAY_S)],
)
def test_retry_after_is_cut_to_range(given_s: float, kept_s: float) -> None:
    assert ErrorInfo(type="E", message="m", retry_after_s=given_s).retry_after_s == kept_s


def test_error_info_failure_class_checked() -> None:
    with pytest.raises(ValidationError, match="failure"):
        ErrorInfo.model_validate({"type": "E", "message": "m", "failure": "gremlins"})
    err = ErrorInfo.model_validate({"type": "E", "message": "m", "failure": "killed"})
    assert err.failure is FailureClass.KILLED


def test_retry_request_failure_classes_checked() -> None:
    obj = {"job_id": "j", "request_id": "r", "at": 1.0}
    assert parse(RetryRequest, {**obj, "failures": ["lost"]}).failures == [FailureClass.LOST]
    assert bad(RetryRequest, {**obj, "failures": ["gremlins"]}).startswith("RetryRequest: failures.0: ")
    assert bad(RetryRequest, {**obj, "request_id": "a b"}).startswith("RetryRequest: request_id: ")
    assert bad(RetryRequest, {**obj, "task_ids": ["a.b"]}).startswith("RetryRequest: task_ids.0: ")


def test_retry_policy_budgets() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.max_lost_leases, policy.max_infra, policy.max_preemptions) == (
        3,
        3,
        10,
        100,
    )
    for field in ("max_attempts", "max_lost_leases", "max_infra", "max_preemptions"):
        with pytest.raises(ValidationError, match=field):
            RetryPolicy.model_validate({field: 0})


def test_heartbeat_reply_fences() -> None:
    reply = HeartbeatReply(fence=[Fence(job_id="j", task_id="t", token=5, reason="x")])
    assert reply.known is True
    assert reply.fence[0].ack is False
    again = HeartbeatReply.from_wire(reply.to_wire())
    assert again == reply


def test_task_event_kind_checked() -> None:
    obj = {"kind": "weird", "job_id": "j", "task_id": "t", "at": 0}
    assert bad(TaskEvent, obj).startswith("TaskEvent: kind: ")
    # states travel as TaskRecords on fleet.state.<job>.<task>, not as events
    assert bad(TaskEvent, {**obj, "kind": "state"}).startswith("TaskEvent: kind: ")


def test_nested_start_report_error_path() -> None:
    obj = {
        "worker_id": "w",
        "at": 0,
        "tasks": [{"task_id": "bad token", "job_id": "j", "attempt": 1, "delivery": 1, "token": 1001}],
    }
    assert bad(StartReport, obj).startswith("StartReport: tasks.0.task_id: ")


def test_job_record_properties() -> None:
    rec = JobRecord(
        job_id="j",
        counts={"succeeded": 2, "failed": 1, "running": 3, "queued": 1, "cancelled": 1, "dead": 1},
        created_at=0,
        updated_at=0,
    )
    assert rec.done == 5
    assert not rec.finished
    assert JobRecord(job_id="j", created_at=0, updated_at=0, finished_at=5.0).finished
