"""The scheduler's pure bookkeeping: admission, dispatch, outcomes, failure classes, cancels, retries,
archive and prune. Fencing is in test_ledger_fencing.py, recovery in test_ledger_restore.py, the
state machine in test_ledger_machine.py."""

from __future__ import annotations

import pytest
from ledger_kit import (
    CXL,
    DEAD,
    FAIL,
    OK,
    T0,
    D,
    J,
    Q,
    R,
    S,
    Shell,
    cancel,
    env,
    no_jitter,
    only,
    policy,
    retry_req,
)

from broker import codec, names
from fleet.core import fencing
from fleet.core.effects import Archive, Broadcast, DeleteDispatch, Dispatch, Publish, Purge, SaveResult
from fleet.core.failures import FailureClass
from fleet.core.ledger import Ledger
from fleet.core.records import DeadLetter, DoneReport

REF = codec.content_ref(b"blob")
REF2 = codec.content_ref(b"another")


# ---- admission and dispatch ------------------------------------------------------------------------------
def test_admit_dispatches_and_the_record_waits_for_the_sequence() -> None:
    ledger = Ledger(rand=no_jitter)
    e = env("t1", queue="gpu")
    assert ledger.admit(e, T0, intake_seq=7) == []  # it waits in the room: no record of its own
    assert ledger.take_states(T0) == []
    assert ledger.release(T0, {}) == []  # no workers
    (d,) = ledger.release(T0, {"gpu": 1})
    assert d == Dispatch(J, "t1", "gpu", attempt=1, dispatch=1, intake_seq=7, envelope=e)
    assert ledger.take_states(T0) == []  # the dispatch is written first (phase 1)
    ledger.dispatched(J, "t1", 1, 555)
    (rec,) = ledger.take_states(T0)
    assert (rec.state, rec.seq, rec.dispatch, rec.attempt, rec.rev, rec.queue) == (D, 555, 1, 1, 1, "gpu")
    assert (rec.intake_seq, rec.token, rec.worker_id) == (7, None, None)
    assert ledger.take_states(T0) == []  # each change is taken once
    (job,) = ledger.take_jobs()
    assert (job.submitted, job.counts, job.finished_at) == (1, {"dispatched": 1}, None)


def test_dispatched_ignores_another_dispatch_number() -> None:
    ledger = Ledger(rand=no_jitter)
    ledger.admit(env("t1"), T0)
    ledger.release(T0, {"default": 1})
    ledger.dispatched(J, "t1", 2, 555)  # not the dispatch the ledger made
    ledger.dispatched(J, "other", 1, 556)
    assert ledger.take_states(T0) == []
    ledger.dispatched(J, "t1", 1, 557)
    assert [r.seq for r in ledger.take_states(T0)] == [557]


def test_second_admit_of_a_task_is_a_no_op() -> None:
    s = Shell()
    s.admit("t1")
    before = len(s.records)
    assert s.admit("t1") == []
    assert len(s.records) == before
    assert s.ledger.jobs[J].submitted == 1


def test_admit_with_future_not_before_waits_for_tick() -> None:
    s = Shell()
    assert s.admit(env("t1", not_before=T0 + 60)) == []
    rec = s.last("t1")
    assert (rec.state, rec.dispatch, rec.seq, rec.not_before) == (Q, 0, None, T0 + 60)
    assert s.tick(T0 + 59.9) == []
    (d,) = only(s.tick(T0 + 60), Dispatch)
    assert (d.dispatch, d.attempt, d.envelope) == (1, 1, None)  # the shell reads it from the intake
    assert (s.last("t1").state, s.last("t1").seq, s.last("t1").not_before) == (D, s.seq, None)
    assert s.tick(T0 + 120) == []


def test_admit_with_past_not_before_dispatches_at_once() -> None:
    s = Shell()
    assert len(only(s.admit(env("t1", not_before=T0 - 5)), Dispatch)) == 1


def test_offloaded_payload_is_kept_as_a_blob_of_its_job() -> None:
    s = Shell()
    s.admit(env("t1", ref=REF))
    assert s.last("t1").blobs == [names.blob_name(J, REF)]
    assert s.ledger.jobs[J].blobs == {names.blob_name(J, REF)}


# ---- start and outcome -------------------------------------------------------------------------------------
def test_start_then_success_saves_the_result() -> None:
    s = Shell()
    s.admit("t1")
    tok = s.start("w1", "t1")
    rec = s.last("t1")
    assert (rec.state, rec.worker_id, rec.token, rec.seq) == (R, "w1", tok, fencing.seq_of(tok))
    assert s.ledger.holders() == ["w1"]
    assert [e.task_id for e in s.ledger.held_by("w1")] == ["t1"]
    out = s.done("t1", tok, worker="w1", result_ref=REF2)
    (saved,) = only(out, SaveResult)
    assert DoneReport.from_wire(saved.raw).token == tok
    assert (saved.job_id, saved.task_id) == (J, "t1")
    rec = s.last("t1")
    assert (rec.state, rec.token, rec.worker_id) == (OK, tok, None)
    assert names.blob_name(J, REF2) in rec.blobs
    assert s.ledger.holders() == []
    assert s.last_job().counts == {"succeeded": 1}


def test_done_without_a_seen_start_is_accepted_from_the_current_dispatch() -> None:
    s = Shell()
    s.admit("t1")
    tok = s.token("t1", delivery=2)
    out = s.done("t1", tok, worker="w2")
    assert len(only(out, SaveResult)) == 1
    assert (s.last("t1").state, s.last("t1").token) == (OK, tok)


def test_duplicate_success_report_is_neither_applied_nor_stale() -> None:
    s = Shell()
    s.admit("t1")
    s.finish("t1")
    tok = s.last("t1").token
    assert tok is not None
    assert s.done("t1", tok) == []
    assert s.ledger.jobs[J].stale_reports == 0
    assert len(s.results("t1")) == 1


def test_report_for_unknown_task_or_job_is_ignored() -> None:
    s = Shell()
    s.admit("t1")
    assert s.done("nope", fencing.make(1, 1)) == []
    assert s.ledger.jobs[J].stale_reports == 1
    assert s.done("t1", fencing.make(1, 1), job="nojob") == []
    assert "nojob" not in s.ledger.jobs


def test_worker_reported_cancel_ends_cancelled() -> None:
    s = Shell()
    s.admit("t1")
    s.finish("t1", outcome="cancelled")
    assert s.last("t1").state == CXL
    assert only(s.effects, SaveResult) == []


# ---- failure classes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FailureClass.ERROR, FailureClass.TIMEOUT, FailureClass.KILLED])
def test_attempt_failures_retry_after_backoff_with_the_next_attempt(cls: FailureClass) -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_attempts=3, backoff_s=10.0)))
    out = s.finish("t1", failure=cls)
    assert only(out, Dispatch) == [] and only(out, SaveResult) == []
    rec = s.last("t1")
    assert (rec.state, rec.attempt, rec.failure, rec.worker_id) == (S, 2, cls, None)
    assert rec.not_before is not None and T0 < rec.not_before <= T0 + 20.0
    assert s.tick(rec.not_before - 0.01) == []
    (d,) = only(s.tick(rec.not_before), Dispatch)
    assert (d.attempt, d.dispatch) == (2, 2)
    assert (s.last("t1").state, s.last("t1").seq) == (D, s.seq)
    assert s.last_job().retries == 1


def test_first_retry_waits_backoff_s() -> None:
    # PROTOCOL.md: after attempt n fails, attempt n+1 waits backoff_s * multiplier^(n-1);
    # retry.backoff_delay(policy, n) computes that, but the ledger passes the *next* attempt number.
    s = Shell()
    s.admit(env("t1", retry=policy(backoff_s=10.0, multiplier=2.0)))
    s.finish("t1", failure=FailureClass.ERROR)
    assert s.last("t1").not_before == T0 + 10.0


def test_attempts_run_out_into_failed_with_the_last_report_saved() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_attempts=2)))
    s.finish("t1", failure=FailureClass.TIMEOUT)
    s.tick(T0 + 1000)
    out = s.finish("t1", failure=FailureClass.TIMEOUT)
    rec = s.last("t1")
    assert (rec.state, rec.attempt, rec.failure) == (FAIL, 2, FailureClass.TIMEOUT)
    (saved,) = only(out, SaveResult)
    assert DoneReport.from_wire(saved.raw).attempt == 2
    assert s.last_job().failures == {"timeout": 1}
    assert s.last_job().finished_at is None  # total unknown: finishes when it settles


def test_not_retryable_error_fails_at_once() -> None:
    s = Shell()
    s.admit("t1")
    out = s.finish("t1", failure=FailureClass.ERROR, retryable=False)
    assert (s.last("t1").state, s.last("t1").attempt) == (FAIL, 1)
    assert len(only(out, SaveResult)) == 1
    assert only(out, Dispatch) == []


def test_retry_after_is_honoured() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(backoff_s=1.0)))
    s.finish("t1", failure=FailureClass.ERROR, retry_after_s=42.0)
    assert s.last("t1").not_before == T0 + 42.0


def test_retry_after_zero_dispatches_at_once() -> None:
    s = Shell()
    s.admit("t1")
    out = s.finish("t1", failure=FailureClass.ERROR, retry_after_s=0.0)
    (d,) = only(out, Dispatch)
    assert (d.attempt, d.dispatch) == (2, 2)
    assert (s.last("t1").state, s.last("t1").attempt) == (D, 2)


def test_preempted_requeues_without_using_attempts() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_attempts=1, max_preemptions=2)))
    old = s.start("w1", "t1")
    out = s.done("t1", old, failure=FailureClass.PREEMPTED)
    (d,) = only(out, Dispatch)
    assert (d.attempt, d.dispatch) == (1, 2)
    assert DeleteDispatch(fencing.seq_of(old)) in out
    rec = s.last("t1")
    assert (rec.state, rec.attempt, rec.preempted, rec.seq) == (D, 1, 1, s.seq)
    assert s.last_job().requeues == 1 and s.last_job().retries == 0
    s.finish("t1", failure=FailureClass.PREEMPTED)
    assert (s.last("t1").state, s.last("t1").preempted) == (FAIL, 2)
    assert s.last_job().failures == {"preempted": 1}


def test_infra_retries_without_using_attempts_until_max_infra() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_attempts=1, max_infra=3)))
    for n in (1, 2):
        s.finish("t1", failure=FailureClass.INFRA)
        rec = s.last("t1")
        assert (rec.state, rec.attempt, rec.infra) == (S, 1, n)
        assert only(s.tick(rec.not_before or 0), Dispatch)[0].attempt == 1
    s.finish("t1", failure=FailureClass.INFRA)
    assert (s.last("t1").state, s.last("t1").infra) == (FAIL, 3)
    assert s.last_job().failures == {"infra": 1}


def test_invalid_input_is_dead_with_a_dead_letter() -> None:
    s = Shell()
    s.admit("t1")
    out = s.finish("t1", failure=FailureClass.INVALID)
    assert s.last("t1").state == DEAD
    (letter,) = only(out, Publish)
    assert letter.subject == names.dlq_task_subject(J, "t1")
    assert letter.msg_id == names.msgid_dead(J, "t1", 1, 1)
    assert isinstance(letter.record, DeadLetter)
    assert (letter.record.failure, letter.record.task_id, letter.record.origin) == (
        FailureClass.INVALID,
        "t1",
        "task",
    )
    assert len(only(out, SaveResult)) == 1
    assert s.last_job().failures == {"invalid": 1}


def test_job_failures_count_failed_and_dead_tasks_by_class() -> None:
    s = Shell()
    s.declare(4)
    s.admit("a", "b", "c", "d")
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    s.finish("b", failure=FailureClass.INVALID)
    s.finish("c", failure=FailureClass.KILLED, retryable=False)
    s.finish("d")
    job = s.last_job()
    assert job.failures == {"error": 1, "invalid": 1, "killed": 1}
    assert job.counts == {"failed": 2, "dead": 1, "succeeded": 1}
    assert job.finished_at == T0


def test_job_is_not_finished_while_a_submitted_task_is_live() -> None:
    # also reached by cancelling a task id that never comes (it counts as submitted)
    s = Shell()
    s.declare(2)
    s.admit("a", "b", "c")
    s.finish("a")
    s.finish("b")
    assert s.state("c") == D
    assert s.last_job().finished_at is None  # today: finished, so it is pruned and archived under c


# ---- cancel ------------------------------------------------------------------------------------------------
def test_cancel_job_cancels_live_tasks_purges_and_broadcasts() -> None:
    s = Shell()
    s.declare(3)
    s.admit("a", "b", "c")
    s.finish("a")
    s.start("w1", "b")
    out = s.cancel()
    assert Purge(names.TASKS_STREAM, names.job_tasks_filter(J)) in out
    (bc,) = only(out, Broadcast)
    assert bc.subject == names.cancel_subject(J) and bc.record == cancel()
    assert [s.state(t) for t in "abc"] == [OK, CXL, CXL]
    assert s.last("b").reason == "cancelled by user"
    job = s.last_job()
    assert job.cancelled and job.finished_at == T0
    assert job.counts == {"succeeded": 1, "cancelled": 2}
    assert s.ledger.holders() == []


def test_cancelled_job_refuses_later_tasks_and_finishes_when_all_are_in() -> None:
    s = Shell()
    s.declare(3)
    s.admit("a")
    s.cancel()
    assert s.last_job().finished_at is None  # 1 of 3 submitted
    assert s.admit("b") == []
    assert s.last("b").state == CXL
    assert s.last_job().finished_at is None
    s.now = T0 + 5
    assert s.admit("c") == []
    assert s.last_job().finished_at == T0 + 5
    assert only(s.effects, Dispatch)[-1].task_id == "a"


def test_cancelled_job_of_unknown_total_settles() -> None:
    s = Shell()
    s.admit("a")
    s.cancel()
    assert s.last_job().finished_at is None
    assert s.apply(s.ledger.archive_due(T0 + 10, retention_s=1e9, settle_s=300)) == []
    assert s.last_job().finished_at is None
    s.apply(s.ledger.archive_due(T0 + 301, retention_s=1e9, settle_s=300))
    assert s.last_job().finished_at == T0 + 301


def test_cancel_one_task_purges_only_its_subject() -> None:
    s = Shell()
    s.admit(env("a", queue="gpu"), "b")
    out = s.cancel("a")
    assert Purge(names.TASKS_STREAM, names.task_subject("gpu", J, "a")) in out
    assert (s.state("a"), s.state("b")) == (CXL, D)
    assert not s.ledger.jobs[J].cancelled


def test_cancel_of_a_task_not_yet_submitted_sticks() -> None:
    s = Shell()
    s.admit("a")
    s.cancel("b")
    assert s.last("b").state == CXL
    assert s.admit("b") == []
    assert s.state("b") == CXL
    assert [d.task_id for d in only(s.effects, Dispatch)] == ["a"]


def test_cancel_does_not_touch_terminal_tasks() -> None:
    s = Shell()
    s.admit("a")
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    rev = s.last("a").rev
    s.cancel()
    assert (s.last("a").state, s.last("a").rev) == (FAIL, rev)


def test_cancel_of_a_task_of_a_pruned_job_changes_nothing() -> None:
    s = Shell()
    s.declare(1)
    s.admit("a")
    s.finish("a")
    s.ledger.prune(T0 + 100, keep_s=10)
    written = len(s.records)
    s.cancel("a")
    # today: a fresh entry: submitted 2, counts {succeeded: 1, cancelled: 1}, and a CANCELLED
    # record with rev 1 that overwrites the SUCCEEDED state of record (or is dropped as a duplicate)
    assert s.records[written:] == []
    job = s.last_job()
    assert (job.submitted, job.counts) == (1, {"succeeded": 1})


def test_cancel_during_backoff_stops_the_retry() -> None:
    s = Shell()
    s.admit("a")
    s.finish("a", failure=FailureClass.ERROR)
    s.cancel("a")
    assert s.tick(T0 + 10_000) == []
    assert s.state("a") == CXL


# ---- retry requests ----------------------------------------------------------------------------------------
def _failed_job() -> Shell:
    """a: failed (error), b: failed (timeout), c: dead (invalid), d: dead (lost), e: succeeded."""
    s = Shell()
    s.declare(5)
    s.admit("a", "b", "c", "e")
    s.admit(env("d", retry=policy(max_lost_leases=1)))
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    s.finish("b", failure=FailureClass.TIMEOUT, retryable=False)
    s.finish("c", failure=FailureClass.INVALID)
    s.start("w9", "d")
    s.worker_lost("w9")
    s.finish("e")
    assert [s.state(t) for t in "abcde"] == [FAIL, FAIL, DEAD, DEAD, OK]
    assert s.last_job().finished_at == T0
    return s


def test_retry_request_reopens_failed_tasks_with_the_next_attempt() -> None:
    s = _failed_job()
    s.now = T0 + 50
    out = s.retry(at=T0 + 50)
    assert sorted((d.task_id, d.attempt, d.dispatch) for d in only(out, Dispatch)) == [
        ("a", 2, 2),
        ("b", 2, 2),
    ]
    assert [s.state(t) for t in "abcde"] == [D, D, DEAD, DEAD, OK]
    job = s.last_job()
    assert job.finished_at is None and job.retried_at == T0 + 50
    assert job.failures == {"invalid": 1, "lost": 1}
    s.finish("a")
    s.finish("b")
    assert s.last_job().finished_at == T0 + 50
    assert s.last_job().failures == {"invalid": 1, "lost": 1}


def test_retry_request_filters() -> None:
    s = _failed_job()
    out = s.retry(failures=[FailureClass.TIMEOUT, FailureClass.LOST])
    assert [d.task_id for d in only(out, Dispatch)] == ["b"]
    out = s.retry(request="r2", at=T0 + 1, include_dead=True, failures=[FailureClass.LOST])
    assert [d.task_id for d in only(out, Dispatch)] == ["d"]
    assert (s.last("d").lost, s.last("d").attempt) == (0, 2)  # a fresh run of every budget
    out = s.retry(request="r3", at=T0 + 2, include_dead=True, task_ids=["a", "c", "e"])
    assert sorted(d.task_id for d in only(out, Dispatch)) == ["a", "c"]
    assert s.state("e") == OK


def test_retry_request_is_applied_once() -> None:
    s = _failed_job()
    assert len(only(s.retry(at=T0 + 5), Dispatch)) == 2
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    assert s.retry(request="again", at=T0 + 5) == []  # redelivered or older
    assert s.retry(request="older", at=T0 + 1) == []
    assert [d.task_id for d in only(s.retry(request="new", at=T0 + 6), Dispatch)] == ["a"]


def test_a_task_that_dies_again_after_a_replay_gets_a_new_dead_letter() -> None:
    # JetStream drops a publish whose Nats-Msg-Id it saw within the dedup window (600 s): the
    # second death's letter (``fleet dlq replay`` and it dies again) would never be stored.
    s = Shell()
    s.admit("a")
    s.finish("a", failure=FailureClass.INVALID)
    s.retry(include_dead=True)
    s.finish("a", failure=FailureClass.INVALID)
    first, second = s.letters()
    assert isinstance(second.record, DeadLetter) and second.record.attempt == 2
    assert first.msg_id != second.msg_id


def test_retry_request_for_unknown_job_does_nothing() -> None:
    s = Shell()
    assert s.apply(s.ledger.retry_request(retry_req("nope"), T0)) == []
    assert "nope" not in s.ledger.jobs


def test_rejected_task_without_an_envelope_is_not_retried() -> None:
    s = Shell()
    s.apply(s.ledger.dead_letter("intake", names.intake_task(J, "bad"), "no such field", b"\xc1", T0))
    assert s.state("bad") == DEAD
    assert s.retry(include_dead=True) == []
    assert s.state("bad") == DEAD


# ---- dead letters of input ---------------------------------------------------------------------------------
def test_undecodable_intake_kills_its_task_once() -> None:
    s = Shell()
    raw = b"\xc1" * (70 * 1024)
    out = s.apply(s.ledger.dead_letter("intake", names.intake_task(J, "t1"), "bad", raw, T0))
    (letter,) = only(out, Publish)
    assert letter.subject == names.dlq_subject("intake")
    assert isinstance(letter.record, DeadLetter)
    assert (letter.record.job_id, letter.record.task_id) == (J, "t1")
    assert len(letter.record.raw) == 64 * 1024
    assert (s.last("t1").state, s.last("t1").failure) == (DEAD, FailureClass.INVALID)
    assert s.admit("t1") == []  # a later good submission of it is a duplicate
    out = s.apply(s.ledger.dead_letter("reports", names.report_done(J, "t2"), "bad", b"", T0))
    assert len(out) == 1 and s.state("t2") is None


def test_reject_of_a_terminal_task_changes_nothing() -> None:
    s = Shell()
    s.admit("a")
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    s.apply(s.ledger.reject(J, "a", "dispatch refused", T0))
    assert s.entry("a").failure == FailureClass.ERROR
    s.retry()
    assert s.ledger.jobs[J].record().failures == {}  # today: {"error": 1, "invalid": -1}


# ---- archive and prune ---------------------------------------------------------------------------------------
def test_archive_after_retention_then_forget() -> None:
    s = Shell()
    s.declare(2)
    s.admit(env("a", ref=REF), "b")
    s.finish("a", result_ref=REF2)
    s.finish("b")
    assert s.ledger.archive_due(T0 + 99, retention_s=100) == []
    (arch,) = s.ledger.archive_due(T0 + 100, retention_s=100)
    assert arch == Archive(J, tuple(sorted([names.blob_name(J, REF), names.blob_name(J, REF2)])))
    assert s.ledger.archive_due(T0 + 200, retention_s=100) == []  # under way: asked once
    s.ledger.archived(J)
    assert J not in s.ledger.jobs and s.ledger.task(J, "a") is None
    assert s.ledger.take_jobs() == []


def test_unfinished_job_is_not_archived() -> None:
    s = Shell()
    s.declare(2)
    s.admit("a")
    s.finish("a")
    assert s.ledger.archive_due(T0 + 1e6, retention_s=100) == []


def test_prune_drops_finished_entries_but_keeps_counts() -> None:
    s = Shell()
    s.declare(1)
    s.admit("a")
    s.finish("a")
    s.declare(1, job="other")
    s.admit("x", job="other")
    assert s.ledger.prune(T0 + 10, keep_s=10) == 0
    assert s.ledger.prune(T0 + 11, keep_s=10) == 1
    assert s.ledger.is_pruned(J) and not s.ledger.is_pruned("other") and not s.ledger.is_pruned("nope")
    assert s.ledger.task(J, "a") is None and s.ledger.task("other", "x") is not None
    assert s.ledger.jobs[J].record().counts == {"succeeded": 1}
    assert s.ledger.prune(T0 + 100, keep_s=10) == 0


def test_reload_brings_a_pruned_job_back_for_a_retry() -> None:
    s = _failed_job()
    records = [s.last(t) for t in "abcde"]
    s.ledger.prune(T0 + 100, keep_s=10)
    assert s.retry() == []  # not in memory
    s.ledger.reload(J, records)
    assert not s.ledger.is_pruned(J)
    assert len(only(s.retry(request="r2", at=T0 + 101), Dispatch)) == 2
    assert s.last_job().counts == {"dispatched": 2, "dead": 2, "succeeded": 1}
