"""Fencing in the ledger (rules in fleet.core.fencing): holders, stale reports, lost leases, fences."""

from __future__ import annotations

from ledger_kit import (
    CXL,
    DEAD,
    OK,
    T0,
    D,
    J,
    Q,
    R,
    S,
    Shell,
    done,
    env,
    heartbeat,
    no_jitter,
    only,
    policy,
    start,
)

from broker import names
from fleet.core import fencing
from fleet.core.effects import DeleteDispatch, Dispatch, Publish, SaveResult
from fleet.core.failures import FailureClass
from fleet.core.ledger import Ledger
from fleet.core.records import DeadLetter, Fence


def fences(s: Shell, worker: str, *held: tuple[str, int], job: str = J) -> list[Fence]:
    return s.ledger.heartbeat_fences(heartbeat(worker, *held, job=job))


# ---- holders -------------------------------------------------------------------------------------------------
def test_duplicate_and_lower_starts_are_ignored() -> None:
    s = Shell()
    s.admit("t1")
    tok = s.start("w1", "t1", delivery=2)
    rev = s.last("t1").rev
    assert s.started("w1", "t1", tok) == []  # the same start again
    assert s.started("w2", "t1", s.token("t1", delivery=1)) == []  # an older delivery of it
    assert s.last("t1").rev == rev
    e = s.entry("t1")
    assert (e.worker, e.token, e.counters.lost) == ("w1", tok, 0)


def test_start_of_an_older_dispatch_is_ignored() -> None:
    s = Shell()
    s.admit("t1")
    old = s.start("w1", "t1")
    s.worker_lost("w1")
    assert s.state("t1") == D
    assert s.started("w1", "t1", old) == []
    assert s.started("w1", "t1", fencing.make(fencing.seq_of(old), 5)) == []
    e = s.entry("t1")
    assert (e.state, e.worker, e.seq) == (D, None, s.seq)


def test_start_of_a_task_never_dispatched_is_ignored() -> None:
    s = Shell()
    s.admit(env("t1", not_before=T0 + 60))
    assert s.started("w1", "t1", fencing.make(5, 1)) == []
    assert s.state("t1") == Q and s.entry("t1").worker is None


def test_start_of_a_terminal_or_retrying_task_is_ignored() -> None:
    s = Shell()
    s.admit("a", "b")
    s.finish("a")
    tok = s.start("w1", "b")
    s.done("b", tok, failure=FailureClass.ERROR)
    for t, state in (("a", OK), ("b", S)):
        seq = s.entry(t).seq or 0
        assert s.started("w2", t, fencing.make(seq, 9)) == []
        assert s.state(t) == state


def test_redelivery_to_another_worker_counts_a_lost_lease() -> None:
    s = Shell()
    s.admit("t1")
    s.start("w1", "t1")
    tok2 = s.start("w2", "t1", delivery=2)
    rec = s.last("t1")
    assert (rec.state, rec.worker_id, rec.token, rec.lost, rec.failure) == (
        R,
        "w2",
        tok2,
        1,
        FailureClass.LOST,
    )
    assert s.ledger.holders() == ["w2"]
    assert s.last_job().requeues == 1
    assert only(s.effects, DeleteDispatch) == []  # the same message keeps running on w2


def test_poison_after_max_lost_leases_goes_dead() -> None:
    s = Shell()
    s.admit("t1")
    seq = s.seq
    s.start("w1", "t1")
    s.start("w2", "t1", delivery=2)
    s.start("w3", "t1", delivery=3)
    assert (s.state("t1"), s.entry("t1").counters.lost) == (R, 2)
    out = s.started("w4", "t1", fencing.make(seq, 4))
    rec = s.last("t1")
    assert (rec.state, rec.lost, rec.worker_id) == (DEAD, 3, None)
    (letter,) = only(out, Publish)
    assert letter.subject == names.dlq_task_subject(J, "t1") == f"fleet.dlq.task.{J}.t1"
    assert isinstance(letter.record, DeadLetter) and letter.record.failure == FailureClass.LOST
    assert DeleteDispatch(seq) in out
    assert s.ledger.holders() == []
    assert s.last_job().failures == {"lost": 1}


def test_lost_leases_across_requeues_share_one_budget() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_lost_leases=3)))
    s.start("w1", "t1")
    s.worker_lost("w1")  # 1: requeued
    s.start("w2", "t1")
    s.start("w3", "t1", delivery=2)  # 2: redelivered
    assert (s.state("t1"), s.entry("t1").counters.lost) == (R, 2)
    out = s.worker_lost("w3")  # 3: poison
    assert s.state("t1") == DEAD
    assert len(only(out, Publish)) == 1 and only(out, Dispatch) == []


# ---- stale reports -------------------------------------------------------------------------------------------
def test_done_from_an_older_dispatch_is_stale() -> None:
    s = Shell()
    s.admit("t1")
    old = s.start("w1", "t1")
    s.worker_lost("w1")
    rev = s.last("t1").rev
    assert s.done("t1", old, worker="w1") == []
    assert s.done("t1", old, worker="w1", failure=FailureClass.ERROR) == []
    assert (s.state("t1"), s.last("t1").rev) == (D, rev)
    assert s.last_job().stale_reports == 2
    new = s.start("w2", "t1")
    assert len(only(s.done("t1", new, worker="w2"), SaveResult)) == 1
    assert s.state("t1") == OK


def test_done_from_a_lower_delivery_is_stale() -> None:
    s = Shell()
    s.admit("t1")
    tok1 = s.start("w1", "t1")
    s.start("w2", "t1", delivery=2)
    assert s.done("t1", tok1, worker="w1") == []
    assert s.done("t1", tok1, worker="w1", failure=FailureClass.ERROR, retry_after_s=0) == []
    assert (s.state("t1"), s.entry("t1").worker) == (R, "w2")
    assert s.last_job().stale_reports == 2


def test_done_from_a_newer_delivery_whose_start_was_not_seen_is_accepted() -> None:
    s = Shell()
    s.admit("t1")
    s.start("w1", "t1")
    tok3 = s.token("t1", delivery=3)
    assert len(only(s.done("t1", tok3, worker="w3"), SaveResult)) == 1
    assert (s.last("t1").state, s.last("t1").token) == (OK, tok3)


def test_at_most_one_outcome_per_attempt() -> None:
    s = Shell()
    s.admit("t1")
    tok1 = s.start("w1", "t1")
    tok2 = s.token("t1", delivery=2)
    s.done("t1", tok2, worker="w2", failure=FailureClass.ERROR)
    assert (s.state("t1"), s.entry("t1").attempt) == (S, 2)
    # both deliveries of attempt 1 report again: nothing more is accepted for it
    assert s.done("t1", tok2, worker="w2") == []
    assert s.done("t1", tok1, worker="w1", failure=FailureClass.ERROR) == []
    assert s.done("t1", tok1, worker="w1", attempt=2) == []  # right attempt, wrong dispatch
    assert (s.state("t1"), s.entry("t1").attempt, s.last_job().retries) == (S, 2, 1)
    assert only(s.effects, SaveResult) == []


def test_a_zombie_failure_never_starts_a_new_attempt() -> None:
    s = Shell()
    s.admit(env("t1", retry=policy(max_attempts=5)))
    zombie = s.start("w1", "t1")
    s.worker_lost("w1")
    holder = s.start("w2", "t1")
    dispatches = len(only(s.effects, Dispatch))
    for cls in FailureClass:
        assert s.done("t1", zombie, worker="w1", failure=cls, retry_after_s=0) == []
    assert len(only(s.effects, Dispatch)) == dispatches
    e = s.entry("t1")
    assert (e.state, e.attempt, e.worker, e.token) == (R, 1, "w2", holder)


def _requeued_before_seq_is_known() -> tuple[Ledger, int]:
    """t1 ran as message 10 (delivery 1 on w1), was preempted and requeued; the new dispatch is not
    published yet. The scheduler handles a whole batch of reports before it publishes their effects
    (and only then calls dispatched()), so reports of message 10 can follow in the same batch."""
    ledger = Ledger(rand=no_jitter)
    ledger.admit(env("t1"), T0)
    ledger.release(T0, {"default": 1})
    ledger.dispatched(J, "t1", 1, 10)
    ledger.started(start("w1", ("t1", fencing.make(10, 1))), T0)
    out = ledger.done(done("t1", fencing.make(10, 1), failure=FailureClass.PREEMPTED), T0)
    out += ledger.release(T0, {"default": 1})
    entry = ledger.task(J, "t1")
    assert entry is not None and entry.state == D and entry.pending and entry.seq == 10
    assert DeleteDispatch(10) in out and only(out, Dispatch)
    return ledger, fencing.make(10, 2)


def test_start_of_the_old_dispatch_is_ignored_while_the_new_seq_is_pending() -> None:
    ledger, tok2 = _requeued_before_seq_is_known()
    ledger.started(start("w2", ("t1", tok2)), T0)  # a redelivery of message 10 to w2
    entry = ledger.task(J, "t1")
    assert entry is not None
    assert (entry.state, entry.worker) == (D, None)  # today: RUNNING, held by w2 on message 10


def test_done_of_the_old_dispatch_is_stale_while_the_new_seq_is_pending() -> None:
    ledger, tok2 = _requeued_before_seq_is_known()
    # a second outcome for the same attempt, from the message the requeue superseded
    assert ledger.done(done("t1", tok2, worker="w2"), T0) == []  # today: accepted, SaveResult
    entry = ledger.task(J, "t1")
    assert entry is not None and entry.state == D


# ---- lost workers ------------------------------------------------------------------------------------------------
def test_worker_lost_requeues_only_its_running_tasks() -> None:
    s = Shell()
    s.admit("a", "b", "c", "d")
    ta = s.start("w1", "a")
    s.start("w2", "b")
    s.finish("c", "w1")
    out = s.worker_lost("w1")
    (d,) = only(out, Dispatch)
    assert (d.task_id, d.attempt, d.dispatch) == ("a", 1, 2)
    assert only(out, DeleteDispatch) == [DeleteDispatch(fencing.seq_of(ta))]
    rec = s.last("a")
    assert (rec.state, rec.seq, rec.lost, rec.worker_id, rec.failure) == (
        D,
        s.seq,
        1,
        None,
        FailureClass.LOST,
    )
    assert "w1" in (rec.reason or "")
    assert [s.state(t) for t in "abcd"] == [D, R, OK, D]
    assert s.ledger.holders() == ["w2"]
    assert s.last_job().requeues == 1
    assert s.worker_lost("w1") == []
    assert s.worker_lost("never-seen") == []


def test_worker_lost_after_its_task_moved_on_changes_nothing() -> None:
    s = Shell()
    s.admit("a")
    s.start("w1", "a")
    s.start("w2", "a", delivery=2)  # w2 took it over
    assert s.worker_lost("w1") == []
    assert (s.state("a"), s.entry("a").worker) == (R, "w2")


# ---- heartbeat fences --------------------------------------------------------------------------------------------
def test_fences_for_terminal_tasks_ack() -> None:
    s = Shell()
    s.admit("a", "b")
    ta = s.start("w1", "a")
    tb = s.start("w1", "b")
    s.done("a", ta, worker="w1")
    s.cancel("b")
    got = fences(s, "w1", ("a", ta), ("b", tb))
    assert [(f.task_id, f.token, f.ack) for f in got] == [("a", ta, True), ("b", tb, True)]
    assert got[0].reason == "already succeeded" and got[1].reason == "cancelled"


def test_fence_for_a_superseded_dispatch_acks() -> None:
    s = Shell()
    s.admit("a")
    old = s.start("w1", "a")
    s.worker_lost("w1")
    (f,) = fences(s, "w1", ("a", old))
    assert (f.ack, f.reason) == (True, "superseded by a newer dispatch")
    s.start("w2", "a")
    assert fences(s, "w1", ("a", old))[0].ack is True


def test_fence_for_an_older_delivery_of_the_held_message_does_not_ack() -> None:
    s = Shell()
    s.admit("a")
    t1 = s.start("w1", "a")
    t2 = s.start("w2", "a", delivery=2)
    (f,) = fences(s, "w1", ("a", t1))
    assert (f.ack, f.job_id, f.task_id, f.token) == (False, J, "a", t1)
    assert fences(s, "w2", ("a", t2)) == []  # the holder runs on


def test_no_fence_for_the_holder_or_a_newer_unseen_delivery() -> None:
    s = Shell()
    s.admit("a", "b")
    ta = s.start("w1", "a")
    assert fences(s, "w1", ("a", ta), ("b", s.token("b", 2))) == []
    assert fences(s, "w1", ("a", s.token("a", 2))) == []


def test_fence_after_the_outcome_was_recorded_while_retrying() -> None:
    s = Shell()
    s.admit("a")
    ta = s.start("w1", "a")
    s.done("a", ta, worker="w1", failure=FailureClass.ERROR)
    (f,) = fences(s, "w1", ("a", ta))
    assert f.ack is True


def test_fence_for_a_pruned_job_and_none_for_an_unknown_one() -> None:
    s = Shell()
    s.declare(1)
    s.admit("a")
    ta = s.start("w1", "a")
    s.done("a", ta, worker="w1")
    s.ledger.prune(T0 + 100, keep_s=10)
    (f,) = fences(s, "w1", ("a", ta))
    assert (f.ack, f.reason) == (True, "job finished")
    assert fences(s, "w1", ("a", ta), job="unknown") == []


def test_cancelled_running_task_is_fenced_and_its_report_is_stale() -> None:
    s = Shell()
    s.admit("a")
    ta = s.start("w1", "a")
    s.cancel()
    assert fences(s, "w1", ("a", ta))[0].reason == "cancelled"
    assert s.done("a", ta, worker="w1", outcome="cancelled") == []
    assert s.state("a") == CXL
