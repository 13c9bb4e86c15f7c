"""Recovery: a fresh ledger rebuilt from the records an old one wrote carries on where it stopped."""

from __future__ import annotations

from collections import Counter

from ledger_kit import CXL, DEAD, FAIL, OK, T0, D, J, Q, R, S, Shell, done, env, heartbeat, no_jitter, only

from broker import names
from fleet.core import fencing
from fleet.core.effects import DeleteDispatch, Dispatch
from fleet.core.failures import FailureClass
from fleet.core.ledger import Ledger
from fleet.core.records import JobRecord, TaskRecord

DAY = 24 * 3600.0


def _busy_job() -> Shell:
    """One task in each live state, plus terminal ones; tasks of a second job."""
    s = Shell()
    s.declare(8)
    s.admit("queued", "running", "retrying", "requeued", "ok", "failed", "dead")
    s.admit(env("later", not_before=T0 + 500))
    s.start("w1", "running")
    s.finish("retrying", "w2", failure=FailureClass.ERROR)  # retry at T0 + 2
    s.start("w3", "requeued")
    s.worker_lost("w3")
    s.finish("ok", "w2")
    s.finish("failed", "w2", failure=FailureClass.ERROR, retryable=False)
    s.finish("dead", "w2", failure=FailureClass.INVALID)
    s.admit("x", job="j2")
    s.start("w2", "x", job="j2")
    return s


def _entries(ledger: Ledger) -> dict[tuple[str, str], tuple[object, ...]]:
    out: dict[tuple[str, str], tuple[object, ...]] = {}
    for job in ledger.jobs.values():
        for e in job.tasks.values():
            c = e.counters
            out[e.key] = (e.state, c.attempt, c.lost, c.infra, c.preempted, e.dispatch, e.seq, e.token)
            out[e.key] += (e.worker, e.failure, e.not_before, e.intake_seq, e.blobs, e.rev, e.queue)
    return out


def test_restore_rebuilds_the_same_ledger() -> None:
    s = _busy_job()
    old = s.ledger
    before = _entries(old)
    assert s.restart() == []  # everything was dispatched: nothing to re-issue
    assert _entries(s.ledger) == before
    for job_id in (J, "j2"):
        a, b = old.jobs[job_id].record(), s.ledger.jobs[job_id].record()
        assert a.model_dump(exclude={"updated_at"}) == b.model_dump(exclude={"updated_at"})
    assert s.ledger.holders() == old.holders() == ["w1", "w2"]
    assert [e.task_id for e in s.ledger.held_by("w2")] == ["x"]
    assert s.ledger.take_states(T0) == []


def test_restored_timers_fire() -> None:
    s = _busy_job()
    s.restart()
    (d,) = only(s.tick(T0 + 2), Dispatch)
    assert (d.task_id, d.attempt, d.dispatch) == ("retrying", 2, 2)
    (d,) = only(s.tick(T0 + 500), Dispatch)
    assert (d.task_id, d.attempt, d.dispatch) == ("later", 1, 1)


def test_restored_ledger_keeps_fencing() -> None:
    s = _busy_job()
    held = s.entry("running").token
    assert held is not None
    (old,) = [r.token for r in s.records if r.task_id == "requeued" and r.state == R]
    assert old is not None and fencing.seq_of(old) != s.entry("requeued").seq
    s.restart()
    assert s.done("requeued", old, worker="w3") == []  # the zombie of the lost lease stays fenced
    assert s.ledger.jobs[J].stale_reports == 1
    (f,) = s.ledger.heartbeat_fences(heartbeat("w2", ("ok", s.entry("ok").token or 0)))
    assert f.ack
    assert s.ledger.heartbeat_fences(heartbeat("w1", ("running", held))) == []
    out = s.worker_lost("w1")
    assert DeleteDispatch(fencing.seq_of(held)) in out
    assert s.state("running") == D


def test_a_dispatch_whose_record_was_lost_is_redispatched_with_the_same_number() -> None:
    s = Shell()
    s.admit("a")
    tok = s.start("w1", "a")
    preempted = done("a", tok, failure=FailureClass.PREEMPTED)
    s.apply(s.ledger.done(preempted, s.now))  # requeued: dispatch 2
    rec = s.records.pop()  # the crash came after dispatch 2 was stored, before its record
    assert (rec.state, rec.dispatch) == (D, 2)
    assert s.restart() == []  # the report was not acknowledged: it comes back
    (d,) = only(s.apply(s.ledger.done(preempted, s.now)), Dispatch)
    assert (d.task_id, d.attempt, d.dispatch, d.intake_seq) == ("a", 1, 2, rec.intake_seq)
    assert names.msgid_dispatch(J, "a", d.attempt, d.dispatch) == names.msgid_dispatch(J, "a", 1, 2)
    assert (s.last("a").state, s.last("a").seq, s.last("a").dispatch) == (D, s.seq, 2)


def test_job_whose_last_task_ended_before_the_crash_is_finished() -> None:
    s = Shell()
    s.declare(2)
    s.admit("a", "b")
    s.finish("a")
    s.finish("b")
    s.job_records.pop()  # the crash came between the task's record and the job's
    assert s.last_job().finished_at is None
    s.restart(now=T0 + 30)
    job = s.last_job()
    assert job.finished_at == T0 + 30 and job.counts == {"succeeded": 2}
    assert s.ledger.is_pruned(J)  # finished: its tasks are not kept in memory


def test_old_records_are_restored_like_any_other() -> None:
    now = T0 + 10 * DAY
    running = TaskRecord(
        job_id=J, task_id="old-run", state=R, rev=3, at=T0, dispatch=1, seq=7, token=7001, worker_id="w1"
    )
    queued = TaskRecord(job_id=J, task_id="old-q", state=D, rev=1, at=now - 73 * 3600, dispatch=1, seq=8)
    job = JobRecord(job_id=J, total=2, submitted=2, created_at=T0, updated_at=T0)
    ledger = Ledger(rand=no_jitter)
    ledger.restore_job(job)
    ledger.restore_task(running)
    ledger.restore_task(queued)
    assert ledger.after_restore(now) == []
    assert ledger.holders() == ["w1"]
    assert ledger.jobs[J].record().counts == {"running": 1, "dispatched": 1}
    s = Shell(ledger)
    s.now = now
    assert [d.task_id for d in only(s.worker_lost("w1"), Dispatch)] == ["old-run"]
    assert s.started("w2", "old-q", fencing.make(8, 1)) == []
    assert s.state("old-q") == R


def test_restore_counts_one_record_per_task() -> None:
    s = _busy_job()
    ledger = Ledger(rand=no_jitter)
    for r in s.records:  # every revision, oldest first: only the last of each task must count
        ledger.restore_task(r)
    ledger.after_restore(T0)
    want = Counter(s.last(t).state for t in ["queued", "running", "retrying", "requeued", "ok", "failed"])
    want.update([DEAD, Q])
    assert {k: v for k, v in ledger.jobs[J].counts.items() if v} == dict(want)
    assert ledger.jobs[J].submitted == 8
    assert ledger.jobs[J].record().failures == {"error": 1, "invalid": 1}


def test_cancel_sticks_across_restore() -> None:
    s = Shell()
    s.admit("a", "b")
    s.finish("a")
    s.cancel()
    s.cancel("c", job="j2")
    s.restart()
    assert s.admit("late") == []
    assert s.state("late") == CXL
    assert s.admit("c", job="j2") == []
    assert s.state("c", job="j2") == CXL
    assert [s.state(t) for t in ("a", "b")] == [OK, CXL]


def test_retry_after_restore_of_a_finished_job() -> None:
    s = Shell()
    s.declare(2)
    s.admit("a", "b")
    s.finish("a", failure=FailureClass.ERROR, retryable=False)
    s.finish("b")
    records = [s.last("a"), s.last("b")]
    s.restart()
    assert s.ledger.is_pruned(J)
    s.ledger.reload(J, records)
    out = s.retry(at=T0 + 1)
    assert [(d.task_id, d.attempt) for d in only(out, Dispatch)] == [("a", 2)]
    assert s.last_job().finished_at is None
    assert s.last_job().counts == {"dispatched": 1, "succeeded": 1}
    s.finish("a")
    assert s.last_job().finished_at == T0


def test_restart_mid_job_then_finish_everything() -> None:
    s = _busy_job()
    s.restart(now=T0 + 1)
    s.tick(T0 + 600)
    for t in ("queued", "retrying", "requeued", "later"):
        s.finish(t, "w9")
    s.finish("running", "w1")  # its holder: the same delivery from another worker would be refused
    s.finish("x", "w2", job="j2")
    assert s.last_job().finished_at == T0 + 600
    assert s.last_job().counts == {"succeeded": 6, "failed": 1, "dead": 1}
    assert [s.state(t) for t in ("failed", "dead")] == [FAIL, DEAD]
    revs = Counter((r.job_id, r.task_id, r.rev) for r in s.records)
    assert max(revs.values()) == 1  # no revision written twice
    assert all(r.state != S or r.not_before for r in s.records)
