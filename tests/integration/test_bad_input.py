"""Hostile or broken input: dead letters, clear reasons, and a scheduler that keeps working."""

from __future__ import annotations

import msgpack
import pytest
from conftest import Stack, count, wait_for
from nats.errors import MaxPayloadError
from nats.js.errors import NoStreamResponseError

from broker import codec, names, reader
from clients.sdk.client import FleetClient
from fleet.core.records import DeadLetter, TaskRecord


async def _dead_letter(
    fleet: FleetClient, origin: str, subject: str, timeout: float = 10.0, stack: Stack | None = None
) -> DeadLetter:
    """The newest dead letter from ``origin`` about ``subject`` (waits for it; gives up early if the
    scheduler of ``stack`` dies)."""

    async def find() -> DeadLetter | None:
        if stack is not None and stack.scheduler_task_done():
            raise AssertionError("the scheduler died")
        found = None  # several inputs of one batch may be dead-lettered: look at all of them
        async for msg in reader.replay(fleet.js, names.DLQ_STREAM, names.dlq_subject(origin)):
            letter = DeadLetter.from_wire(msg.data or b"")
            found = letter if letter.subject == subject else found
        return found

    found: DeadLetter = await wait_for(find, timeout=timeout, what=f"dead letter for {subject}")
    return found


async def _final_state(fleet: FleetClient, job: str, task: str, timeout: float = 10.0) -> TaskRecord:
    async def final() -> TaskRecord | None:
        ev = await fleet.state(job, task)
        return ev if ev is not None and ev.state in ("succeeded", "failed", "dead", "cancelled") else None

    found: TaskRecord = await wait_for(final, timeout=timeout, what=f"{job}/{task} to end")
    return found


async def _still_works(stack: Stack) -> None:
    """The scheduler (and a worker) still run a fresh job to the end."""
    assert stack.scheduler is not None and not stack.scheduler_task_done(), "the scheduler died"
    fleet = stack.client
    job = await fleet.submit_job("handlers:square", items=range(10), bundle=2)
    record = await fleet.wait_job(job, timeout=10)
    assert record.counts == {"succeeded": 5}
    assert not stack.scheduler_task_done(), "the scheduler died"


async def test_malformed_msgpack_on_intake_is_dead_lettered(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    subject = names.intake_task("j-garbage", "t1")
    raw = b"\xc1\xc1 this is not msgpack"
    await fleet.js.publish(subject, raw)

    letter = await _dead_letter(fleet, "intake", subject)
    assert letter.origin == "intake" and letter.raw == raw
    assert letter.job_id == "j-garbage" and letter.task_id == "t1"
    assert "msgpack" in letter.reason
    state = await _final_state(fleet, "j-garbage", "t1")
    assert state.state == "dead" and "msgpack" in (state.reason or "")
    await _still_works(stack)


async def test_msgpack_that_is_not_a_map_is_dead_lettered(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    subject = names.intake_task("j-list", "t1")
    await fleet.js.publish(subject, msgpack.packb([1, 2, 3]))

    letter = await _dead_letter(fleet, "intake", subject)
    assert "map" in letter.reason
    assert (await _final_state(fleet, "j-list", "t1")).state == "dead"
    await _still_works(stack)


async def test_wrong_field_type_is_dead_with_the_field_named(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    env = await fleet.envelope(job_id="j-prio", task_id="t1", handler="handlers:square", args=[2])
    body = env.model_dump(mode="python", exclude_none=True)
    body["priority"] = "high"
    subject = names.intake_task("j-prio", "t1")
    await fleet.js.publish(subject, codec.pack(body))

    state = await _final_state(fleet, "j-prio", "t1")
    assert state.state == "dead"
    assert "priority" in (state.reason or "")
    letter = await _dead_letter(fleet, "intake", subject)
    assert "priority" in letter.reason and letter.task_id == "t1"
    await _still_works(stack)


async def test_missing_required_field_and_bad_handler_are_named(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    env = await fleet.envelope(job_id="j-miss", task_id="t1", handler="handlers:square", args=[2])
    body = env.model_dump(mode="python", exclude_none=True)
    del body["payload"]
    await fleet.js.publish(names.intake_task("j-miss", "t1"), codec.pack(body))
    body = env.model_dump(mode="python", exclude_none=True)
    body.update(task_id="t2", handler="not a handler path")
    await fleet.js.publish(names.intake_task("j-miss", "t2"), codec.pack(body))

    assert "payload" in ((await _final_state(fleet, "j-miss", "t1")).reason or "")
    assert "not a handler path" in ((await _final_state(fleet, "j-miss", "t2")).reason or "")
    await _still_works(stack)


async def test_subject_and_body_disagree(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    env = await fleet.envelope(job_id="j-real", task_id="t1", handler="handlers:square", args=[2])
    subject = names.intake_task("j-other", "t9")
    await fleet.js.publish(subject, env.to_wire())

    letter = await _dead_letter(fleet, "intake", subject)
    assert "does not match" in letter.reason
    assert (await _final_state(fleet, "j-other", "t9")).state == "dead"
    assert await fleet.state("j-real", "t1") is None, "the mismatched body must not be admitted"
    await _still_works(stack)


async def test_garbage_on_other_intake_subjects(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    for subject in (
        names.intake_job("j-bad"),
        names.intake_cancel("j-bad"),
        names.intake_retry("j-bad", "r1"),
    ):
        await fleet.js.publish(subject, b"\xff\xfe garbage")
        letter = await _dead_letter(fleet, "intake", subject)
        assert letter.raw == b"\xff\xfe garbage"
    with pytest.raises(NoStreamResponseError):  # an unknown kind is refused at once, never stored
        await fleet.js.publish("fleet.intake.bogus.x", b"?")
    await _still_works(stack)


async def test_garbage_reports_and_heartbeats_do_not_stop_the_scheduler(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    done_subject = names.report_done("j-rep", "t1")
    await fleet.js.publish(done_subject, b"\x00\x01 not a report")
    start_subject = names.report_start("bogus-worker")
    await fleet.js.publish(start_subject, msgpack.packb({"worker_id": "bogus-worker", "tasks": "nope"}))
    await fleet.js.publish("fleet.report.weird.x", b"?")
    # heartbeats: undecodable, wrong types, and a well-formed one from a worker that then vanishes
    await fleet.nc.publish(names.heartbeat_subject("w1"), b"\x93garbage")
    await fleet.nc.publish(names.heartbeat_subject("w2"), msgpack.packb({"worker_id": 5, "slots": "many"}))
    await fleet.nc.publish(names.heartbeat_subject("w3"), msgpack.packb([1, 2]))
    await fleet.nc.publish("fleet.hb.w4", b"")
    await fleet.nc.flush()

    letter = await _dead_letter(fleet, "reports", done_subject)
    assert "msgpack" in letter.reason
    assert await fleet.state("j-rep", "t1") is None, "a garbage report must not invent a task"
    letter = await _dead_letter(fleet, "reports", "fleet.report.weird.x")
    assert "unknown report subject" in letter.reason
    await _still_works(stack)


async def test_garbage_on_the_task_stream_is_dropped_and_the_worker_survives(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    subject = names.task_subject("default", "j-corrupt", "t1")
    await fleet.js.publish(subject, b"\xc1 corrupt task")

    await wait_for(
        lambda: _none_left(fleet, subject), timeout=10, what="the worker to drop the corrupt message"
    )
    assert await fleet.state("j-corrupt", "t1") is None, "not dispatched by the scheduler: no task"
    assert all(not t.done() for t in stack.worker_tasks()), "a worker died"
    await _still_works(stack)


async def _none_left(fleet: FleetClient, subject: str) -> bool:
    return await count(fleet.js, names.TASKS_STREAM, subject) == 0


async def test_oversize_publish_is_refused_and_the_scheduler_is_unaffected(stack: Stack) -> None:
    await stack.up(workers=1)
    fleet = stack.client
    subject = names.intake_task("j-huge", "t1")
    with pytest.raises(MaxPayloadError):
        await fleet.js.publish(subject, b"\x00" * (2 * 1024 * 1024))
    with pytest.raises(MaxPayloadError):
        await fleet.nc.publish(names.heartbeat_subject("huge"), b"\x00" * (2 * 1024 * 1024))
    assert await fleet.state("j-huge", "t1") is None
    assert fleet.nc.is_connected
    await _still_works(stack)


async def test_garbage_just_under_max_payload_is_dead_lettered(stack: Stack) -> None:
    """Regression: the dead letter for input just under max_payload must itself fit, or publishing it
    stops the scheduler (and the unacked input would crash it again after every restart)."""
    await stack.up(workers=1)
    fleet = stack.client
    subject = names.intake_task("j-big", "t1")
    body = b"\xc1" * (fleet.nc.max_payload - 16)
    await fleet.js.publish(subject, body)  # accepted: under the server's limit
    try:
        letter = await _dead_letter(fleet, "intake", subject, stack=stack)
        assert letter.task_id == "t1"
        assert 0 < len(letter.raw) < len(body) and body.startswith(letter.raw), "raw is kept, truncated"
        assert (await _final_state(fleet, "j-big", "t1")).state == "dead"
        await _still_works(stack)
    finally:
        crash = stack.forget_crashed_scheduler()
    assert crash is None, f"the scheduler crashed: {crash!r}"


async def test_times_from_outside_are_bounded(stack: Stack) -> None:
    """The fault audit's killers: `not_before: inf`, `Retry(delay_s=inf)`, a far-future not_before."""
    await stack.up(workers=1)
    fleet = stack.client
    env = await fleet.envelope(job_id="j-inf", task_id="t1", handler="handlers:square", args=[2])
    body = env.model_dump(mode="python", exclude_none=True)
    body["not_before"] = float("inf")
    await fleet.js.publish(names.intake_task("j-inf", "t1"), codec.pack(body))
    state = await _final_state(fleet, "j-inf", "t1")
    assert state.state == "dead" and "not_before" in (state.reason or "")

    job, task = await fleet.submit("handlers:retry_at_infinity", 1)

    async def waiting() -> TaskRecord | None:
        rec = await fleet.state(job, task)
        return rec if rec is not None and rec.state == "retrying" else None

    rec = await wait_for(waiting, timeout=10, what="the task waiting for its (cut) retry delay")
    assert rec.not_before is not None and 6.9 * 86400 < rec.not_before - rec.at <= 7 * 86400

    far = await fleet.envelope(job_id="j-far", task_id="t1", handler="handlers:square", args=[3])
    await fleet.js.publish(
        names.intake_task("j-far", "t1"), far.model_copy(update={"not_before": 7.0e9}).to_wire()
    )

    async def held() -> TaskRecord | None:
        rec = await fleet.state("j-far", "t1")
        return rec if rec is not None and rec.state == "queued" else None

    rec = await wait_for(held, timeout=10, what="the far-future task held by the scheduler")
    assert rec.dispatch == 0 and rec.not_before == 7.0e9
    info = await fleet.js.consumer_info(names.INTAKE_STREAM, names.INTAKE_CONSUMER)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0, "no redelivery loop"
    await _still_works(stack)


async def test_a_sweep_that_cannot_be_encoded_declares_nothing(stack: Stack) -> None:
    await stack.up(workers=0)
    fleet = stack.client
    with pytest.raises(ValueError, match="cannot be encoded"):
        await fleet.submit_job("handlers:square", items=[1, object()], job_id="j-never")
    with pytest.raises(ValueError):
        await fleet.submit_job("not a handler", items=[1], job_id="j-never")
    assert await count(fleet.js, names.INTAKE_STREAM, names.intake_job("j-never")) == 0
