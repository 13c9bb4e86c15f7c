"""The scheduler's pure bookkeeping, driven through whole task lifecycles under virtual time."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import names
from fleet.core.ledger import (
    Admit,
    Broadcast,
    Decision,
    Defer,
    Effect,
    Ledger,
    NotBefore,
    Publish,
    Purge,
    Reject,
    attempt_id,
    task_key,
)
from fleet.core.liveness import WorkerView
from fleet.core.records import (
    CancelRequest,
    DeadLetter,
    DoneReport,
    ErrorInfo,
    JobRecord,
    JobSpec,
    Payload,
    RetryPolicy,
    StartedTask,
    StartReport,
    TaskEnvelope,
    TaskEvent,
)
from fleet.core.states import TERMINAL, TaskState, can_move

T0 = 10_000.0
Q, R, S = TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING
OK, FAIL, DEAD, CXL = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DEAD, TaskState.CANCELLED


# ---- builders -------------------------------------------------------------------------------------------
def envelope(
    job: str = "j1",
    task: str = "t1",
    *,
    attempt: int = 1,
    queue: str = "default",
    max_attempts: int = 3,
    not_before: float | None = None,
) -> TaskEnvelope:
    return TaskEnvelope(
        job_id=job,
        task_id=task,
        handler="pkg.mod:func",
        payload=Payload(size=1, data=b"\xc0"),
        queue=queue,
        retry=RetryPolicy(max_attempts=max_attempts, backoff_s=1.0, multiplier=2.0, jitter=0.1),
        created_at=T0,
        attempt=attempt,
        not_before=not_before,
    )


def start(worker: str, *tasks: tuple[str, str, int, int], at: float = T0) -> StartReport:
    return StartReport(
        worker_id=worker,
        at=at,
        tasks=[StartedTask(job_id=j, task_id=t, attempt=a, delivery=d) for j, t, a, d in tasks],
    )


def report(
    env: TaskEnvelope,
    outcome: str = "succeeded",
    *,
    attempt: int | None = None,
    delivery: int = 1,
    worker: str = "w1",
    retryable: bool = True,
    error: bool = True,
    with_envelope: bool = True,
) -> DoneReport:
    failed = outcome == "failed"
    return DoneReport.model_validate(
        {
            "job_id": env.job_id,
            "task_id": env.task_id,
            "attempt": env.attempt if attempt is None else attempt,
            "delivery": delivery,
            "worker_id": worker,
            "outcome": outcome,
            "error": ErrorInfo(type="IOError", message="boom", retryable=retryable)
            if failed and error
            else None,
            "result": Payload(size=1, data=b"\x01") if outcome == "succeeded" else None,
            "started_at": T0,
            "finished_at": T0,
            "envelope": env if with_envelope else None,
        }
    )


def view(worker: str, tasks: Sequence[str] = (), now: float = T0) -> WorkerView:
    return WorkerView(
        worker_id=worker,
        queue="default",
        host="h",
        pid=1,
        slots=4,
        busy=len(tasks),
        tasks=frozenset(tasks),
        last_seen=now,
        interval_s=1.0,
    )


def no_jitter() -> float:
    return 0.5


# ---- effect inspection ---------------------------------------------------------------------------------------
def events(effects: Sequence[Effect]) -> list[TaskEvent]:
    out = []
    for e in effects:
        if isinstance(e, Publish) and isinstance(e.record, TaskEvent):
            assert e.subject == names.event_subject(e.record.job_id, e.record.task_id, names.EVENT_STATE)
            assert e.record.kind == "state"
            assert e.msg_id is None
            out.append(e.record)
    return out


def moves(effects: Sequence[Effect]) -> list[tuple[str, TaskState | None]]:
    return [(ev.task_id, ev.state) for ev in events(effects)]


def dispatches(effects: Sequence[Effect]) -> list[Publish]:
    return [e for e in effects if isinstance(e, Publish) and e.subject.startswith("fleet.task.")]


def retries(effects: Sequence[Effect]) -> list[Publish]:
    return [e for e in effects if isinstance(e, Publish) and e.subject.startswith("fleet.intake.retry.")]


def state(ledger: Ledger, job: str = "j1", task: str = "t1") -> TaskState | None:
    entry = ledger.tasks.get(task_key(job, task))
    return None if entry is None else entry.state


def counts(ledger: Ledger, job: str = "j1") -> dict[str, int]:
    return {str(s): n for s, n in ledger.jobs[job].counts.items() if n}


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(rand=no_jitter)


def run_to(ledger: Ledger, env: TaskEnvelope, st_: TaskState, *, worker: str = "w1", now: float = T0) -> None:
    """Drive one task from nothing to ``st_`` (QUEUED, RUNNING, RETRYING or SUCCEEDED)."""
    decision, _ = ledger.admit(env, now)
    assert decision == Admit()
    if st_ == Q:
        return
    ledger.started(start(worker, (env.job_id, env.task_id, env.attempt, 1)), now)
    if st_ == R:
        return
    outcome = "succeeded" if st_ == OK else "failed"
    ledger.done(report(env, outcome, worker=worker), now)
    assert state(ledger, env.job_id, env.task_id) == st_


# ---- helpers ------------------------------------------------------------------------------------------------
def test_keys() -> None:
    assert task_key("j", "t") == "j/t"
    assert attempt_id("j", "t", 3) == "j/t:3"


def test_not_before_policy() -> None:
    policy = NotBefore()
    assert policy.decide(envelope(), T0) == Admit()
    assert policy.decide(envelope(not_before=T0), T0) == Admit()
    assert policy.decide(envelope(not_before=T0 - 1), T0) == Admit()
    assert policy.decide(envelope(not_before=T0 + 2.5), T0) == Defer(2.5, "retry backoff")


# ---- admission ---------------------------------------------------------------------------------------------
def test_admit_dispatches_then_announces(ledger: Ledger) -> None:
    env = envelope()
    decision, effects = ledger.admit(env, T0)
    assert decision == Admit()
    assert len(effects) == 2
    dispatch, event = effects
    assert isinstance(dispatch, Publish)
    assert dispatch.subject == "fleet.task.default.j1.t1"
    assert dispatch.msg_id == "j1/t1:1"
    assert dispatch.record == env
    assert isinstance(event, Publish)
    assert event.record == TaskEvent(kind="state", job_id="j1", task_id="t1", at=T0, state=Q, attempt=1)
    assert state(ledger) == Q
    assert counts(ledger) == {"queued": 1}
    assert ledger.jobs["j1"].task_ids == {"t1"}


def test_dispatch_goes_to_the_envelope_queue(ledger: Ledger) -> None:
    _, effects = ledger.admit(envelope(queue="gpu"), T0)
    assert [d.subject for d in dispatches(effects)] == ["fleet.task.gpu.j1.t1"]


def test_duplicate_submissions_are_no_ops(ledger: Ledger) -> None:
    env = envelope()
    ledger.admit(env, T0)
    for st_ in (Q, R, OK):
        if st_ == R:
            ledger.started(start("w1", ("j1", "t1", 1, 1)), T0 + 1)
        if st_ == OK:
            ledger.done(report(env), T0 + 2)
        before = counts(ledger)
        assert ledger.admit(env, T0 + 3) == (Admit(), [])
        assert state(ledger) == st_
        assert counts(ledger) == before


def test_rejecting_policy_makes_the_task_dead() -> None:
    class NoGpu:
        def decide(self, env: TaskEnvelope, now: float) -> Decision:
            return Reject("no gpu queue here") if env.queue == "gpu" else Admit()

    ledger = Ledger(policies=[NotBefore(), NoGpu()], rand=no_jitter)
    decision, effects = ledger.admit(envelope(queue="gpu"), T0)
    assert decision == Reject("no gpu queue here")
    assert dispatches(effects) == []
    assert [(ev.state, ev.reason) for ev in events(effects)] == [(DEAD, "no gpu queue here")]
    assert counts(ledger) == {"dead": 1}
    decision, effects = ledger.admit(envelope(task="t2"), T0)
    assert decision == Admit()
    assert len(dispatches(effects)) == 1


def test_first_deferring_policy_wins() -> None:
    class Later:
        def decide(self, env: TaskEnvelope, now: float) -> Decision:
            return Defer(7.0, "quota")

    class Never:
        def decide(self, env: TaskEnvelope, now: float) -> Decision:  # pragma: no cover - must not run
            raise AssertionError("policies after a Defer must not be asked")

    ledger = Ledger(policies=[Later(), Never()])
    assert ledger.admit(envelope(), T0) == (Defer(7.0, "quota"), [])
    assert state(ledger) is None
    assert "t1" not in ledger.jobs["j1"].task_ids


# ---- success ---------------------------------------------------------------------------------------------
def test_full_success_lifecycle(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", name="nightly", total=2, created_at=T0 - 5), T0)
    e1, e2 = envelope(task="t1"), envelope(task="t2")
    seen: list[TaskEvent] = []

    for i, env in enumerate((e1, e2)):
        _, eff = ledger.admit(env, T0 + i)
        assert [d.msg_id for d in dispatches(eff)] == [f"j1/{env.task_id}:1"]
        seen += events(eff)
    assert counts(ledger) == {"queued": 2}

    eff = ledger.started(start("w1", ("j1", "t1", 1, 1), ("j1", "t2", 1, 1)), T0 + 2)
    seen += events(eff)
    assert counts(ledger) == {"running": 2}
    assert all(ev.worker_id == "w1" for ev in events(eff))

    eff, nxt = ledger.done(report(e1), T0 + 3)
    assert nxt is None
    seen += events(eff)
    assert ledger.jobs["j1"].finished_at is None
    eff, nxt = ledger.done(report(e2), T0 + 4)
    seen += events(eff)
    assert counts(ledger) == {"succeeded": 2}

    job = ledger.jobs["j1"]
    assert job.finished_at == T0 + 4
    assert job.done == 2
    assert [(ev.task_id, ev.state, ev.at) for ev in seen] == [
        ("t1", Q, T0),
        ("t2", Q, T0 + 1),
        ("t1", R, T0 + 2),
        ("t2", R, T0 + 2),
        ("t1", OK, T0 + 3),
        ("t2", OK, T0 + 4),
    ]

    (rec,) = ledger.take_dirty()
    assert rec == JobRecord(
        job_id="j1",
        name="nightly",
        total=2,
        submitted=2,
        counts={"succeeded": 2},
        created_at=T0 - 5,
        updated_at=T0 + 4,
        finished_at=T0 + 4,
    )
    assert rec.finished
    assert ledger.take_dirty() == []


def test_job_without_total_never_finishes_by_itself(ledger: Ledger) -> None:
    run_to(ledger, envelope(), OK)
    assert ledger.jobs["j1"].finished_at is None
    ledger.declare(JobSpec(job_id="j1", total=1, created_at=T0), T0 + 9)
    assert ledger.jobs["j1"].finished_at == T0 + 9


def test_job_with_total_zero_is_finished_at_once(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", total=0, created_at=T0), T0)
    assert ledger.jobs["j1"].finished_at == T0


def test_done_without_start_report(ledger: Ledger) -> None:
    env = envelope()
    ledger.admit(env, T0)
    eff, _ = ledger.done(report(env, worker="w9"), T0 + 1)
    assert moves(eff) == [("t1", R), ("t1", OK)]
    assert events(eff)[0].worker_id == "w9"


def test_done_for_unknown_task_after_restart(ledger: Ledger) -> None:
    eff, _ = ledger.done(report(envelope()), T0)
    assert moves(eff) == [("t1", Q), ("t1", R), ("t1", OK)]
    assert counts(ledger) == {"succeeded": 1}


def test_duplicate_and_stale_done_reports_are_no_ops(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, OK)
    before = counts(ledger)
    assert ledger.done(report(env), T0 + 1) == ([], None)
    assert ledger.done(report(env, "failed"), T0 + 1) == ([], None)
    assert ledger.done(report(env, "cancelled"), T0 + 1) == ([], None)
    assert counts(ledger) == before


def test_done_cancelled_outcome(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    eff, nxt = ledger.done(report(env, "cancelled"), T0 + 1)
    assert nxt is None
    assert [(ev.state, ev.reason) for ev in events(eff)] == [(CXL, "cancelled while running")]


# ---- failures and retries ------------------------------------------------------------------------------
def test_failure_with_retry_then_success(ledger: Ledger) -> None:
    env = envelope(max_attempts=3)
    run_to(ledger, env, R)

    eff, nxt = ledger.done(report(env, "failed"), T0 + 5)
    assert nxt is not None
    assert moves(eff) == [("t1", S)]
    ev = events(eff)[0]
    assert ev.attempt == 1
    assert ev.reason == "IOError: boom (retry in 1.0s)"
    (pub,) = retries(eff)
    assert eff[-1] is pub, "the retry is published after the state change"
    assert pub.subject == names.intake_retry("j1", "t1")
    assert pub.msg_id == "retry:j1/t1:2"
    assert pub.record == nxt
    assert nxt.attempt == 2
    assert nxt.not_before == T0 + 5 + 1.0
    assert nxt.model_copy(update={"attempt": 1, "not_before": None}) == env
    assert dispatches(eff) == []
    assert ledger.jobs["j1"].retries == 1
    assert counts(ledger) == {"retrying": 1}

    decision, eff = ledger.admit(nxt, T0 + 5.25)
    assert isinstance(decision, Defer)
    assert decision.delay_s == pytest.approx(0.75)
    assert decision.reason == "retry backoff"
    assert eff == []
    assert state(ledger) == S

    decision, eff = ledger.admit(nxt, T0 + 6.0)
    assert decision == Admit()
    (dispatch,) = dispatches(eff)
    assert dispatch.subject == "fleet.task.default.j1.t1"
    assert dispatch.msg_id == "j1/t1:2"
    assert isinstance(dispatch.record, TaskEnvelope)
    assert dispatch.record.attempt == 2
    assert dispatch.record.not_before is None
    assert [(e.state, e.attempt, e.reason) for e in events(eff)] == [(Q, 2, "retry")]
    assert eff[0] is dispatch

    # the retry envelope again (redelivered intake) is a duplicate now
    assert ledger.admit(nxt, T0 + 7) == (Admit(), [])
    # a late report of attempt 1 is stale
    assert ledger.done(report(env, "failed"), T0 + 7) == ([], None)
    assert ledger.started(start("w1", ("j1", "t1", 1, 2)), T0 + 7) == []

    eff = ledger.started(start("w2", ("j1", "t1", 2, 1)), T0 + 8)
    assert [(e.state, e.attempt, e.worker_id) for e in events(eff)] == [(R, 2, "w2")]
    eff, nxt2 = ledger.done(report(nxt, worker="w2"), T0 + 9)
    assert nxt2 is None
    assert moves(eff) == [("t1", OK)]
    assert counts(ledger) == {"succeeded": 1}
    assert ledger.jobs["j1"].retries == 1


def test_backoff_doubles_between_attempts(ledger: Ledger) -> None:
    env = envelope(max_attempts=5)
    run_to(ledger, env, R)
    now = T0
    expected = [1.0, 2.0, 4.0]
    for want in expected:
        now += 1
        _, nxt = ledger.done(report(env, "failed"), now)
        assert nxt is not None
        assert nxt.not_before == now + want
        now = nxt.not_before
        assert ledger.admit(nxt, now)[0] == Admit()
        ledger.started(start("w1", ("j1", "t1", nxt.attempt, 1)), now)
        env = nxt
    assert ledger.jobs["j1"].retries == 3


def test_retries_exhausted_fails(ledger: Ledger) -> None:
    env = envelope(max_attempts=2)
    run_to(ledger, env, R)
    _, nxt = ledger.done(report(env, "failed"), T0 + 1)
    assert nxt is not None
    ledger.admit(nxt, T0 + 10)
    ledger.started(start("w1", ("j1", "t1", 2, 1)), T0 + 11)
    eff, last = ledger.done(report(nxt, "failed"), T0 + 12)
    assert last is None
    assert retries(eff) == []
    assert [(e.state, e.reason, e.attempt) for e in events(eff)] == [(FAIL, "IOError: boom", 2)]
    assert counts(ledger) == {"failed": 1}
    assert ledger.jobs["j1"].retries == 1


def test_single_attempt_policy_fails_at_once(ledger: Ledger) -> None:
    env = envelope(max_attempts=1)
    run_to(ledger, env, R)
    eff, nxt = ledger.done(report(env, "failed"), T0 + 1)
    assert (moves(eff), nxt, retries(eff)) == ([("t1", FAIL)], None, [])


def test_non_retryable_error_fails_at_once(ledger: Ledger) -> None:
    env = envelope(max_attempts=5)
    run_to(ledger, env, R)
    eff, nxt = ledger.done(report(env, "failed", retryable=False), T0 + 1)
    assert nxt is None
    assert retries(eff) == []
    assert moves(eff) == [("t1", FAIL)]
    assert ledger.jobs["j1"].retries == 0


def test_failure_without_envelope_cannot_retry(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    eff, nxt = ledger.done(report(env, "failed", with_envelope=False), T0 + 1)
    assert (moves(eff), nxt) == ([("t1", FAIL)], None)


def test_failure_without_error_info_is_retryable(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    eff, nxt = ledger.done(report(env, "failed", error=False), T0 + 1)
    assert nxt is not None
    assert events(eff)[0].reason == "failed (retry in 1.0s)"


def test_handler_requested_retry_delay_wins(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    rep = report(env, "failed")
    assert rep.error is not None
    rep = rep.model_copy(update={"error": rep.error.model_copy(update={"retry_after_s": 42.0})})
    eff, nxt = ledger.done(rep, T0)
    assert nxt is not None
    assert nxt.not_before == T0 + 42.0
    assert events(eff)[0].reason == "IOError: boom (retry in 42.0s)"
    assert isinstance(ledger.admit(nxt, T0 + 41.0)[0], Defer)
    assert ledger.admit(nxt, T0 + 42.0)[0] == Admit()


def test_retry_after_does_not_make_a_permanent_error_retryable(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    rep = report(env, "failed", retryable=False)
    assert rep.error is not None
    rep = rep.model_copy(update={"error": rep.error.model_copy(update={"retry_after_s": 1.0})})
    assert ledger.done(rep, T0)[1] is None
    assert state(ledger) == FAIL


def test_random_jitter_is_applied_to_not_before() -> None:
    ledger = Ledger(rand=lambda: 1.0)
    env = envelope()  # backoff 1.0, jitter 0.1
    run_to(ledger, env, R)
    _, nxt = ledger.done(report(env, "failed"), T0)
    assert nxt is not None
    assert nxt.not_before == pytest.approx(T0 + 1.1)


def test_original_submission_redelivered_while_retrying_is_ignored(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, S)
    assert ledger.admit(env, T0 + 100) == (Admit(), [])
    assert state(ledger) == S


def test_repeated_failed_report_while_retrying_is_a_no_op(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R)
    _, nxt = ledger.done(report(env, "failed"), T0 + 1)
    assert nxt is not None
    assert ledger.done(report(env, "failed"), T0 + 2) == ([], None)
    assert ledger.jobs["j1"].retries == 1


# ---- leases, redelivery, lost workers ----------------------------------------------------------------------
def test_redelivery_while_running_counts_a_requeue(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, R, worker="w1")
    eff = ledger.started(start("w2", ("j1", "t1", 1, 2)), T0 + 30)
    assert [(e.state, e.worker_id, e.reason) for e in events(eff)] == [
        (Q, None, "lease expired on w1; redelivered"),
        (R, "w2", None),
    ]
    assert ledger.jobs["j1"].requeues == 1
    assert ledger.tasks["j1/t1"].worker == "w2"
    assert ledger.tasks["j1/t1"].delivery == 2
    assert counts(ledger) == {"running": 1}
    # the same start report again, or an older one, changes nothing
    assert ledger.started(start("w2", ("j1", "t1", 1, 2)), T0 + 31) == []
    assert ledger.started(start("w1", ("j1", "t1", 1, 1)), T0 + 31) == []
    assert ledger.jobs["j1"].requeues == 1
    # w1 is no longer holding it: losing w1 does not requeue
    assert ledger.worker_lost(view("w1", ["j1/t1"]), T0 + 32) == []


def test_start_reports_for_terminal_or_stale_tasks_are_skipped(ledger: Ledger) -> None:
    env = envelope()
    run_to(ledger, env, OK)
    assert ledger.started(start("w2", ("j1", "t1", 1, 5)), T0 + 1) == []
    assert ledger.started(start("w2", ("j1", "t1", 2, 1)), T0 + 1) == []
    assert counts(ledger) == {"succeeded": 1}


def test_start_report_for_unknown_task_rebuilds_it(ledger: Ledger) -> None:
    eff = ledger.started(start("w1", ("j1", "t1", 1, 1)), T0)
    assert moves(eff) == [("t1", Q), ("t1", R)]
    assert counts(ledger) == {"running": 1}


def test_worker_lost_requeues_its_running_tasks(ledger: Ledger) -> None:
    for t in ("t1", "t2", "t3"):
        ledger.admit(envelope(task=t), T0)
    ledger.started(start("w1", ("j1", "t1", 1, 1), ("j1", "t2", 1, 1)), T0 + 1)
    ledger.started(start("w2", ("j1", "t3", 1, 1)), T0 + 1)

    eff = ledger.worker_lost(view("w1"), T0 + 10)
    assert [(e.task_id, e.state, e.reason) for e in events(eff)] == [
        ("t1", Q, "lease lost: worker w1 missed heartbeats"),
        ("t2", Q, "lease lost: worker w1 missed heartbeats"),
    ]
    assert dispatches(eff) == [], "JetStream redelivers; the scheduler does not re-publish"
    assert ledger.jobs["j1"].requeues == 2
    assert counts(ledger) == {"queued": 2, "running": 1}
    assert state(ledger, "j1", "t3") == R
    assert ledger.worker_lost(view("w1"), T0 + 11) == []

    # the redelivered message starts on w2 with a higher delivery count: back to RUNNING, no new requeue
    eff = ledger.started(start("w2", ("j1", "t1", 1, 2)), T0 + 12)
    assert [(e.state, e.worker_id) for e in events(eff)] == [(R, "w2")]
    assert ledger.jobs["j1"].requeues == 2
    assert ledger.tasks["j1/t1"].worker == "w2"

    eff = ledger.worker_lost(view("w2"), T0 + 20)
    assert sorted(moves(eff)) == [("t1", Q), ("t3", Q)]
    assert ledger.jobs["j1"].requeues == 4


def test_worker_lost_ignores_tasks_not_running(ledger: Ledger) -> None:
    run_to(ledger, envelope(task="t1"), OK)
    run_to(ledger, envelope(task="t2"), S)
    run_to(ledger, envelope(task="t3"), Q)
    assert ledger.worker_lost(view("w1", ["j1/t1", "j1/t2", "j1/t3", "j9/zz"]), T0 + 5) == []
    assert ledger.jobs["j1"].requeues == 0


def test_worker_lost_uses_heartbeat_task_list_for_unattributed_tasks(ledger: Ledger) -> None:
    # after a restart the ledger may know a task is RUNNING without knowing where
    ledger.restore_task(TaskEvent(kind="state", job_id="j1", task_id="t1", at=T0, state=R, attempt=1))
    ledger.restore_task(
        TaskEvent(kind="state", job_id="j1", task_id="t2", at=T0, state=R, attempt=1, worker_id="w2")
    )
    eff = ledger.worker_lost(view("w1", ["j1/t1", "j1/t2"]), T0 + 5)
    assert moves(eff) == [("t1", Q)]
    assert state(ledger, "j1", "t2") == R


def test_worker_lost_for_restored_worker_attribution(ledger: Ledger) -> None:
    ledger.restore_task(
        TaskEvent(kind="state", job_id="j1", task_id="t1", at=T0, state=R, attempt=2, worker_id="w1")
    )
    eff = ledger.worker_lost(view("w1"), T0 + 5)
    assert [(e.state, e.attempt) for e in events(eff)] == [(Q, 2)]


def test_redelivery_of_a_retry_attempt_is_detected(ledger: Ledger) -> None:
    env = envelope(max_attempts=3)
    ledger.admit(env, T0)
    for d, w in ((1, "w1"), (2, "w2"), (3, "w3")):
        ledger.started(start(w, ("j1", "t1", 1, d)), T0 + d)
    assert ledger.jobs["j1"].requeues == 2
    _, nxt = ledger.done(report(env, "failed", delivery=3, worker="w3"), T0 + 4)
    assert nxt is not None
    ledger.admit(nxt, T0 + 10)
    ledger.started(start("w4", ("j1", "t1", 2, 1)), T0 + 11)
    eff = ledger.started(start("w5", ("j1", "t1", 2, 2)), T0 + 40)
    assert [(e.state, e.worker_id) for e in events(eff)] == [(Q, None), (R, "w5")]
    assert ledger.jobs["j1"].requeues == 3
    assert ledger.tasks["j1/t1"].worker == "w5"


# ---- cancellation --------------------------------------------------------------------------------------
def test_cancel_job(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", total=6, created_at=T0), T0)
    run_to(ledger, envelope(task="t1"), Q)
    run_to(ledger, envelope(task="t2"), R)
    run_to(ledger, envelope(task="t3"), OK)
    env4 = envelope(task="t4")
    run_to(ledger, env4, R)
    _, nxt4 = ledger.done(report(env4, "failed"), T0)
    assert nxt4 is not None
    req = CancelRequest(job_id="j1", reason="user asked", at=T0 + 1)

    eff = ledger.cancel(req, T0 + 1)
    assert eff[0] == Purge("fleet.task.*.j1.*")
    assert eff[1] == Broadcast("fleet.ctl.cancel.j1", req)
    assert [(e.task_id, e.state, e.reason) for e in events(eff)] == [
        ("t1", CXL, "user asked"),
        ("t2", CXL, "user asked"),
        ("t4", CXL, "user asked"),
    ]
    assert counts(ledger) == {"succeeded": 1, "cancelled": 3}
    job = ledger.jobs["j1"]
    assert job.cancelled
    assert job.finished_at == T0 + 1
    assert ledger.take_dirty()[0].cancelled

    # later input for the job: submissions end CANCELLED, reports are ignored
    decision, eff = ledger.admit(envelope(task="t5"), T0 + 2)
    assert decision == Admit()
    assert dispatches(eff) == []
    assert [(e.task_id, e.state, e.reason) for e in events(eff)] == [("t5", CXL, "job cancelled")]
    assert ledger.admit(nxt4, T0 + 100) == (Admit(), [])
    assert ledger.done(report(envelope(task="t2")), T0 + 3) == ([], None)
    assert ledger.started(start("w1", ("j1", "t1", 1, 1)), T0 + 3) == []
    assert counts(ledger) == {"succeeded": 1, "cancelled": 4}
    assert job.finished_at == T0 + 1

    # cancelling again is harmless
    eff = ledger.cancel(req, T0 + 4)
    assert events(eff) == []
    assert counts(ledger) == {"succeeded": 1, "cancelled": 4}


def test_cancel_one_task(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", queue="cpu", created_at=T0), T0)
    run_to(ledger, envelope(task="t1", queue="cpu"), R)
    run_to(ledger, envelope(task="t2", queue="cpu"), R)
    req = CancelRequest(job_id="j1", task_id="t1", at=T0 + 1)
    eff = ledger.cancel(req, T0 + 1)
    assert moves(eff) == [("t1", CXL)]
    assert eff[-2:] == [Purge("fleet.task.cpu.j1.t1"), Broadcast("fleet.ctl.cancel.j1", req)]
    assert not ledger.jobs["j1"].cancelled
    assert state(ledger, "j1", "t2") == R
    # a resubmission of the cancelled task is a duplicate; other tasks still run
    assert ledger.admit(envelope(task="t1", queue="cpu"), T0 + 2) == (Admit(), [])
    assert moves(ledger.done(report(envelope(task="t2")), T0 + 3)[0]) == [("t2", OK)]


def test_cancel_of_an_unknown_task_is_ignored(ledger: Ledger) -> None:
    # a typo'd task id must not create a phantom task that could finish the job early
    assert ledger.cancel(CancelRequest(job_id="j1", task_id="t1", at=T0), T0) == []
    assert "j1/t1" not in ledger.tasks
    _, eff = ledger.admit(envelope(), T0 + 1)
    assert moves(eff) == [("t1", Q)]


def test_cancel_unknown_job_then_submit(ledger: Ledger) -> None:
    eff = ledger.cancel(CancelRequest(job_id="j1", at=T0), T0)
    assert events(eff) == []
    assert ledger.jobs["j1"].finished_at == T0
    _, eff = ledger.admit(envelope(), T0 + 1)
    assert moves(eff) == [("t1", CXL)]
    assert counts(ledger) == {"cancelled": 1}


def test_cancel_one_task_purges_the_queue_it_was_sent_to(ledger: Ledger) -> None:
    _, eff = ledger.admit(envelope(queue="gpu"), T0)
    sent_to = dispatches(eff)[0].subject
    eff = ledger.cancel(CancelRequest(job_id="j1", task_id="t1", at=T0), T0 + 1)
    purges = [e.subject for e in eff if isinstance(e, Purge)]
    assert len(purges) == 1
    pat, sub = purges[0].split("."), sent_to.split(".")
    assert len(pat) == len(sub)
    assert all(p in ("*", s) for p, s in zip(pat, sub, strict=True))


# ---- dead letters --------------------------------------------------------------------------------------
def test_dead_letter_for_a_task_subject(ledger: Ledger) -> None:
    subject = names.intake_task("j1", "t1")
    eff = ledger.dead_letter("intake", subject, "payload: Field required", b"\x81\xa1x\x01", T0)
    dlq = eff[0]
    assert isinstance(dlq, Publish)
    assert dlq.subject == "fleet.dlq.intake"
    assert dlq.record == DeadLetter(
        origin="intake",
        subject=subject,
        reason="payload: Field required",
        at=T0,
        job_id="j1",
        task_id="t1",
        raw=b"\x81\xa1x\x01",
    )
    assert [(e.state, e.reason) for e in events(eff)] == [(DEAD, "payload: Field required")]
    assert counts(ledger) == {"dead": 1}
    # a later valid submission of the same task is a duplicate
    assert ledger.admit(envelope(), T0 + 1) == (Admit(), [])


def test_malformed_done_report_does_not_kill_the_running_task(ledger: Ledger) -> None:
    # garbage on a known task's subject is recorded, but cannot end a valid task
    run_to(ledger, envelope(), R)
    eff = ledger.dead_letter("reports", names.report_done("j1", "t1"), "bad", b"\xc1", T0 + 1)
    assert moves(eff) == []
    assert state(ledger) == R
    dlq = eff[0]
    assert isinstance(dlq, Publish)
    assert dlq.subject == "fleet.dlq.reports"


def test_dead_letter_for_a_work_subject(ledger: Ledger) -> None:
    run_to(ledger, envelope(queue="gpu"), Q)
    eff = ledger.dead_letter("worker", names.task_subject("gpu", "j1", "t1"), "corrupt", b"", T0 + 1)
    letter = eff[0].record  # type: ignore[union-attr]
    assert isinstance(letter, DeadLetter)
    assert (letter.job_id, letter.task_id) == ("j1", "t1")
    assert moves(eff) == []  # the task was admitted: only the record is kept


def test_dead_letter_for_finished_task_only_records(ledger: Ledger) -> None:
    run_to(ledger, envelope(), OK)
    eff = ledger.dead_letter("reports", names.report_done("j1", "t1"), "bad", b"", T0 + 1)
    assert len(eff) == 1
    assert state(ledger) == OK


@pytest.mark.parametrize(
    ("subject", "job", "task"),
    [
        ("nonsense", None, None),
        ("", None, None),
        ("fleet.intake.job.j1", None, None),
        ("fleet.intake.cancel.j1", None, None),
        ("fleet.intake.task.j*1.t1", None, None),
        ("fleet.intake.task.j1.t>", None, None),
        ("fleet.intake.task.j1", None, None),
        ("fleet.intake.bogus", None, None),
        ("fleet.report.start.w1", None, None),
    ],
)
def test_dead_letter_for_malformed_subjects(
    ledger: Ledger, subject: str, job: str | None, task: str | None
) -> None:
    eff = ledger.dead_letter("intake", subject, "why", b"raw", T0)
    assert len(eff) == 1
    letter = eff[0].record  # type: ignore[union-attr]
    assert isinstance(letter, DeadLetter)
    assert (letter.job_id, letter.task_id, letter.raw, letter.subject) == (job, task, b"raw", subject)
    assert ledger.tasks == {}


def test_dead_letter_for_start_report_has_no_job(ledger: Ledger) -> None:
    eff = ledger.dead_letter("reports", names.report_start("w1"), "bad", b"", T0)
    letter = eff[0].record  # type: ignore[union-attr]
    assert isinstance(letter, DeadLetter)
    assert letter.job_id is None


def test_rejected_retry_ends_the_task() -> None:
    class RejectRetries:
        def decide(self, env: TaskEnvelope, now: float) -> Decision:
            return Reject("over quota") if env.attempt > 1 else Admit()

    ledger = Ledger(policies=[NotBefore(), RejectRetries()], rand=no_jitter)
    env = envelope()
    run_to(ledger, env, R)
    _, nxt = ledger.done(report(env, "failed"), T0)
    assert nxt is not None
    decision, _ = ledger.admit(nxt, T0 + 10)
    assert decision == Reject("over quota")
    assert state(ledger) in TERMINAL


# ---- recovery and housekeeping -----------------------------------------------------------------------------
def test_restore_rebuilds_counts_and_record(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", name="n", tenant="acme", queue="q1", total=5, created_at=T0), T0)
    last: dict[str, TaskEvent] = {}

    def feed(effects: Sequence[Effect]) -> None:
        for ev in events(effects):
            last[ev.task_id] = ev

    for t in ("t1", "t2", "t3", "t4", "t5"):
        feed(ledger.admit(envelope(task=t, queue="q1"), T0)[1])
    feed(ledger.started(start("w1", ("j1", "t1", 1, 1), ("j1", "t2", 1, 1), ("j1", "t3", 1, 1)), T0 + 1))
    feed(ledger.started(start("w2", ("j1", "t3", 1, 2)), T0 + 2))  # a requeue
    feed(ledger.done(report(envelope(task="t1")), T0 + 3)[0])
    feed(ledger.done(report(envelope(task="t2"), "failed"), T0 + 4)[0])  # RETRYING
    feed(ledger.cancel(CancelRequest(job_id="j1", task_id="t5", at=T0 + 5), T0 + 5))
    (record,) = ledger.take_dirty()
    assert record.counts == {"cancelled": 1, "queued": 1, "retrying": 1, "running": 1, "succeeded": 1}

    fresh = Ledger(rand=no_jitter)
    fresh.restore_job(record)
    for ev in last.values():
        fresh.restore_task(TaskEvent.from_wire(ev.to_wire()))
    assert fresh.jobs["j1"].record() == record
    assert {k: (e.state, e.attempt) for k, e in fresh.tasks.items()} == {
        k: (e.state, e.attempt) for k, e in ledger.tasks.items()
    }
    assert fresh.tasks["j1/t3"].worker == "w2"

    # the restored ledger carries on: w2 dies, t3 is requeued and finishes elsewhere
    assert moves(fresh.worker_lost(view("w2"), T0 + 10)) == [("t3", Q)]
    assert fresh.jobs["j1"].requeues == 2
    fresh.started(start("w1", ("j1", "t3", 1, 3)), T0 + 11)
    fresh.done(report(envelope(task="t3")), T0 + 12)
    fresh.done(report(envelope(task="t4")), T0 + 12)
    assert counts(fresh) == {"cancelled": 1, "retrying": 1, "succeeded": 3}


def test_restore_task_replays_last_state_wins(ledger: Ledger) -> None:
    for st_ in (Q, R, S, Q, R, OK):
        ledger.restore_task(TaskEvent(kind="state", job_id="j1", task_id="t1", at=T0, state=st_, attempt=2))
    assert counts(ledger) == {"succeeded": 1}
    assert ledger.tasks["j1/t1"].attempt == 2


def test_restore_task_ignores_events_without_state(ledger: Ledger) -> None:
    ledger.restore_task(TaskEvent(kind="progress", job_id="j1", task_id="t1", at=T0, progress=0.5))
    assert ledger.tasks == {}


def test_restore_job_keeps_finished_and_cancelled(ledger: Ledger) -> None:
    rec = JobRecord(
        job_id="j1",
        total=3,
        retries=4,
        requeues=5,
        cancelled=True,
        created_at=T0 - 100,
        updated_at=T0 - 10,
        finished_at=T0 - 10,
    )
    ledger.restore_job(rec)
    job = ledger.jobs["j1"]
    assert (job.total, job.retries, job.requeues, job.cancelled) == (3, 4, 5, True)
    assert (job.created_at, job.updated_at, job.finished_at) == (T0 - 100, T0 - 10, T0 - 10)
    # still cancelled: new submissions are cancelled
    assert moves(ledger.admit(envelope(), T0)[1]) == [("t1", CXL)]


def test_prune_forgets_finished_jobs(ledger: Ledger) -> None:
    ledger.declare(JobSpec(job_id="j1", total=1, created_at=T0), T0)
    run_to(ledger, envelope(job="j1"), OK, now=T0 + 1)
    run_to(ledger, envelope(job="j2"), R, now=T0 + 1)
    assert ledger.jobs["j1"].finished_at == T0 + 1
    assert ledger.prune(T0 + 50, keep_s=60) == 0
    assert ledger.prune(T0 + 61, keep_s=60) == 0  # exactly keep_s: kept
    assert ledger.prune(T0 + 61.5, keep_s=60) == 1
    assert set(ledger.jobs) == {"j2"}
    assert set(ledger.tasks) == {"j2/t1"}
    assert ledger.prune(T0 + 10_000, keep_s=60) == 0
    ledger.take_dirty()  # a pruned dirty job is not reported
    assert "j1" not in {r.job_id for r in ledger.take_dirty()}


def test_take_dirty_reports_each_changed_job_once(ledger: Ledger) -> None:
    ledger.admit(envelope(job="j2"), T0)
    ledger.admit(envelope(job="j1"), T0)
    assert [r.job_id for r in ledger.take_dirty()] == ["j1", "j2"]
    assert ledger.take_dirty() == []
    ledger.started(start("w1", ("j2", "t1", 1, 1)), T0 + 1)
    (rec,) = ledger.take_dirty()
    assert (rec.job_id, rec.counts, rec.updated_at) == ("j2", {"running": 1}, T0 + 1)


# ---- randomized: interleavings never corrupt the books ---------------------------------------------------------
JOBS = ("j1", "j2")
TASKS = ("t1", "t2", "t3")
WORKERS = ("w1", "w2")
job_ids = st.sampled_from(JOBS)
task_ids = st.sampled_from(TASKS)
workers = st.sampled_from(WORKERS)
attempts = st.integers(1, 3)
deliveries = st.integers(1, 4)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(rand=random.Random(1234).random)
        self.now = T0
        self.pending: list[TaskEnvelope] = []
        self.terminal: dict[str, TaskState] = {}
        self.restored = False

    # every input goes through here: effects must describe legal moves that end in the ledger's state
    def apply(self, effects: Sequence[Effect]) -> None:
        states = {k: e.state for k, e in self.ledger.tasks.items()}
        before = dict(self._before)
        for eff in effects:
            assert isinstance(eff, Publish | Broadcast | Purge)
            if isinstance(eff, Broadcast):
                assert eff.subject.startswith("fleet.ctl.cancel.")
            elif isinstance(eff, Purge):
                assert eff.subject.startswith("fleet.task.")
            elif isinstance(eff.record, TaskEvent):
                key = task_key(eff.record.job_id, eff.record.task_id)
                assert eff.record.state is not None
                assert can_move(before.get(key), eff.record.state), (before.get(key), eff.record.state)
                before[key] = eff.record.state
            elif eff.subject.startswith("fleet.task."):
                env = eff.record
                assert isinstance(env, TaskEnvelope)
                assert env.not_before is None
                assert eff.msg_id == attempt_id(env.job_id, env.task_id, env.attempt)
            elif eff.subject.startswith("fleet.intake.retry."):
                assert isinstance(eff.record, TaskEnvelope)
                assert states[task_key(eff.record.job_id, eff.record.task_id)] == TaskState.RETRYING
                assert eff.msg_id == "retry:" + attempt_id(
                    eff.record.job_id, eff.record.task_id, eff.record.attempt
                )
                self.pending.append(eff.record)
            else:
                assert eff.subject.startswith("fleet.dlq."), eff.subject
        for key, st_ in before.items():
            if key in states:
                assert states[key] == st_, key

    def step(self, dt: float) -> None:
        self.now += dt
        self._before = {k: e.state for k, e in self.ledger.tasks.items()}

    @rule(job=job_ids, total=st.none() | st.integers(0, 4))
    def declare(self, job: str, total: int | None) -> None:
        self.step(0.1)
        self.apply(self.ledger.declare(JobSpec(job_id=job, total=total, created_at=self.now), self.now))

    @rule(job=job_ids, task=task_ids, max_attempts=attempts)
    def submit(self, job: str, task: str, max_attempts: int) -> None:
        self.step(0.1)
        decision, eff = self.ledger.admit(envelope(job, task, max_attempts=max_attempts), self.now)
        assert isinstance(decision, Admit)
        self.apply(eff)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), wait=st.floats(0, 5))
    def resubmit_retry(self, data: st.DataObject, wait: float) -> None:
        self.step(wait)
        env = data.draw(st.sampled_from(self.pending))
        decision, eff = self.ledger.admit(env, self.now)
        if isinstance(decision, Defer):
            assert env.not_before is not None
            assert decision.delay_s == pytest.approx(env.not_before - self.now)
            assert eff == []
        self.apply(eff)

    @rule(
        worker=workers,
        batch=st.lists(st.tuples(job_ids, task_ids, attempts, deliveries), min_size=1, max_size=3),
    )
    def started(self, worker: str, batch: list[tuple[str, str, int, int]]) -> None:
        self.step(0.1)
        self.apply(self.ledger.started(start(worker, *batch), self.now))

    @rule(
        job=job_ids,
        task=task_ids,
        attempt=attempts,
        delivery=deliveries,
        worker=workers,
        outcome=st.sampled_from(["succeeded", "failed", "failed", "cancelled"]),
        retryable=st.booleans(),
        with_envelope=st.booleans(),
    )
    def done(self, **kw: Any) -> None:
        self.step(0.1)
        env = envelope(kw.pop("job"), kw.pop("task"), attempt=kw["attempt"])
        eff, nxt = self.ledger.done(report(env, **kw), self.now)
        if nxt is not None:
            assert nxt.attempt == kw["attempt"] + 1
        self.apply(eff)

    @rule(worker=workers, extra=st.lists(st.builds(task_key, job_ids, task_ids), max_size=3))
    def lose_worker(self, worker: str, extra: list[str]) -> None:
        self.step(1.0)
        self.apply(self.ledger.worker_lost(view(worker, extra, self.now), self.now))

    @rule(job=job_ids, task=st.none() | task_ids)
    def cancel(self, job: str, task: str | None) -> None:
        self.step(0.1)
        eff = self.ledger.cancel(CancelRequest(job_id=job, task_id=task, at=self.now), self.now)
        self.apply(eff)
        if task is None:
            assert self.ledger.jobs[job].cancelled
            assert all(
                self.ledger.tasks[task_key(job, t)].state in TERMINAL
                for t in self.ledger.jobs[job].task_ids
                if self.ledger.tasks[task_key(job, t)].state is not None
            )

    @rule(job=job_ids, task=task_ids, origin=st.sampled_from(["intake", "reports"]))
    def dead_letter(self, job: str, task: str, origin: str) -> None:
        self.step(0.1)
        kind = "intake.task" if origin == "intake" else "report.done"
        eff = self.ledger.dead_letter(origin, f"fleet.{kind}.{job}.{task}", "bad", b"", self.now)
        self.apply(eff)

    @rule(job=job_ids, task=task_ids, st_=st.sampled_from(list(TaskState)), worker=st.none() | workers)
    def restore(self, job: str, task: str, st_: TaskState, worker: str | None) -> None:
        self.step(0.1)
        ev = TaskEvent(
            kind="state", job_id=job, task_id=task, at=self.now, state=st_, attempt=1, worker_id=worker
        )
        self.ledger.restore_task(ev)
        self.terminal.pop(task_key(job, task), None)
        self.restored = True

    @rule(keep=st.floats(0, 20))
    def prune(self, keep: float) -> None:
        self.step(1.0)
        self.ledger.prune(self.now, keep)
        self.terminal = {k: v for k, v in self.terminal.items() if k in self.ledger.tasks}

    @rule()
    def flush(self) -> None:
        for rec in self.ledger.take_dirty():
            assert rec.job_id in self.ledger.jobs
            assert all(n > 0 for n in rec.counts.values())

    @invariant()
    def counts_match_tasks(self) -> None:
        for job_id, job in self.ledger.jobs.items():
            assert all(n >= 0 for n in job.counts.values()), job.counts
            with_state = [e for e in self.ledger.tasks.values() if e.job_id == job_id and e.state is not None]
            assert sum(job.counts.values()) == len(with_state)
            for st_ in TaskState:
                assert job.counts.get(st_, 0) == sum(1 for e in with_state if e.state == st_)
            assert job.retries >= 0
            assert job.requeues >= 0
        for entry in self.ledger.tasks.values():
            assert entry.task_id in self.ledger.jobs[entry.job_id].task_ids

    @invariant()
    def terminal_is_forever(self) -> None:
        for key, st_ in self.terminal.items():
            assert self.ledger.tasks[key].state == st_, key
        for key, entry in self.ledger.tasks.items():
            if entry.state in TERMINAL:
                self.terminal[key] = entry.state

    @invariant()
    def finished_means_done(self) -> None:
        if self.restored:
            return
        for job in self.ledger.jobs.values():
            if job.finished_at is None:
                continue
            complete = job.total is not None and job.done >= job.total and len(job.task_ids) >= job.total
            assert complete or (job.cancelled and job.done >= len(job.task_ids))


LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LEDGER_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase
