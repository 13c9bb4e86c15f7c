"""The ledger against an adversarial world: any order of deliveries, redeliveries, stale and zombie
reports, lost workers, cancels, retries, timers and restarts (a Hypothesis state machine).

The world keeps the work queue (live messages by stream sequence, as JetStream would) and every
delivery a worker was handed. Workers act on any delivery they ever got, current or not; the shell
feeds each dispatch's sequence back at once, as the scheduler's applier does.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from ledger_kit import T0, D, J, Q, R, S, Shell, done, env, heartbeat, policy

from broker import names
from fleet.core import fencing
from fleet.core.effects import DeleteDispatch, Effect, Purge, SaveResult
from fleet.core.failures import FailureClass
from fleet.core.records import DoneReport, TaskRecord
from fleet.core.states import TERMINAL, TaskState
from fleet.core.tasks import TaskEntry

TASKS = ("a", "b", "c")
WORKERS = ("w1", "w2", "w3")
POLICY = policy(max_attempts=2, max_lost_leases=2, max_infra=2, max_preemptions=2, backoff_s=1.0)
Delivery = tuple[str, str, int, int]  # worker, task, token, attempt

outcomes = st.sampled_from(["succeeded", "cancelled", *FailureClass])


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Shell()
        self.s.declare(len(TASKS))
        self.live: dict[int, tuple[str, int]] = {}  # FLEET_TASKS: seq -> (task, attempt)
        self.deliveries: Counter[int] = Counter()
        self.got: list[Delivery] = []  # every delivery handed out, current or not
        self.last_dispatch: dict[str, int] = {}
        self.max_token: dict[str, int] = {}
        self.revs: dict[str, int] = {}
        self.outcomes: Counter[tuple[str, int]] = Counter()  # accepted outcomes per (task, seq)
        self.saved: Counter[tuple[str, int]] = Counter()  # SaveResults per (task, attempt)
        self.successes: Counter[str] = Counter()
        self.states: dict[str, TaskState | None] = dict.fromkeys(TASKS)
        self.taken = 0
        self.dispatched = 0

    # -- helpers -------------------------------------------------------------------------------------------
    def entry(self, task: str) -> TaskEntry | None:
        return self.s.ledger.task(J, task)

    def settle(self, effects: list[Effect], *, reopen: bool = False) -> list[TaskRecord]:
        """Check what one input did, and carry its effects out on the world."""
        self._dispatches()
        for eff in effects:
            self._effect(eff)
        new = self.s.records[self.taken :]
        self.taken = len(self.s.records)
        for r in new:
            assert r.rev > self.revs.get(r.task_id, 0), "record revisions must grow"
            self.revs[r.task_id] = r.rev
        self._states(reopen)
        return new

    def _dispatches(self) -> None:
        for d, seq in self.s.dispatches[self.dispatched :]:
            assert d.dispatch > self.last_dispatch.get(d.task_id, 0), "a dispatch number was reused"
            self.last_dispatch[d.task_id] = d.dispatch
            entry = self.entry(d.task_id)
            assert entry is not None and d.attempt == entry.attempt
            self.live[seq] = (d.task_id, d.attempt)
        self.dispatched = len(self.s.dispatches)

    def _effect(self, eff: Effect) -> None:
        if isinstance(eff, DeleteDispatch):
            for t in TASKS:  # a delete never hits the live dispatch of a live task
                e = self.entry(t)
                assert e is None or e.state in TERMINAL or e.seq != eff.seq, (t, eff)
            self.live.pop(eff.seq, None)
        elif isinstance(eff, Purge):
            assert eff.stream == names.TASKS_STREAM
            for seq, (t, _) in list(self.live.items()):
                if eff.subject in (names.job_tasks_filter(J), names.task_subject("default", J, t)):
                    del self.live[seq]
        elif isinstance(eff, SaveResult):
            rep = DoneReport.from_wire(eff.raw)
            self.saved[(rep.task_id, rep.attempt)] += 1
            assert self.saved[(rep.task_id, rep.attempt)] == 1, "two outcomes saved for one attempt"
            if rep.outcome == "succeeded":
                self.successes[rep.task_id] += 1
                assert self.successes[rep.task_id] == 1, "a task committed twice"

    def _states(self, reopen: bool) -> None:
        for t in TASKS:
            e = self.entry(t)
            if e is None:
                continue
            before = self.states[t]
            if before in TERMINAL and e.state != before:  # only a retry request reopens
                assert reopen and before in (TaskState.FAILED, TaskState.DEAD) and e.state in (Q, D), (
                    t,
                    before,
                )
            self.states[t] = e.state
            if e.token is not None:
                assert e.token >= self.max_token.get(t, 0), "a holder's token went backwards"
                self.max_token[t] = e.token

    # -- inputs ------------------------------------------------------------------------------------------------
    @rule(task=st.sampled_from(TASKS))
    def admit(self, task: str) -> None:
        ledger = self.s.ledger
        if ledger.is_pruned(J) and ledger.task(J, task) is None:
            known = [r for r in self.s.records if r.task_id == task]
            ledger.reload(J, known[-1:], keep_pruned=True)
        self.settle(self.s.admit(env(task, retry=POLICY)))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), worker=st.sampled_from(WORKERS), seen=st.booleans())
    def deliver(self, data: st.DataObject, worker: str, seen: bool) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        task, attempt = self.live[seq]
        self.deliveries[seq] += 1
        tok = fencing.make(seq, self.deliveries[seq])
        self.got.append((worker, task, tok, attempt))
        if seen:  # else its start report is still on its way (or lost)
            self.settle(self.s.started(worker, task, tok, attempt=attempt))

    @precondition(lambda self: self.got)
    @rule(data=st.data())
    def stale_start(self, data: st.DataObject) -> None:
        worker, task, tok, attempt = data.draw(st.sampled_from(self.got))
        self.settle(self.s.started(worker, task, tok, attempt=attempt))

    @precondition(lambda self: self.got)
    @rule(
        data=st.data(),
        outcome=outcomes,
        retryable=st.booleans(),
        retry_after=st.sampled_from([None, 0.0, 5.0]),
    )
    def report(self, data: st.DataObject, outcome: str, retryable: bool, retry_after: float | None) -> None:
        worker, task, tok, attempt = data.draw(st.sampled_from(self.got))
        failure = None if outcome in ("succeeded", "cancelled") else FailureClass(outcome)
        e = self.entry(task)
        pre = None if e is None else (e.state, e.seq, e.token, e.attempt)
        rep = done(
            task,
            tok,
            worker=worker,
            attempt=attempt,
            outcome=outcome,
            failure=failure,
            retryable=retryable,
            retry_after_s=retry_after,
        )
        job = self.s.ledger.jobs[J]
        stale = job.stale_reports
        new = self.settle(self.s.apply(self.s.ledger.done(rep, self.s.now, raw=rep.to_wire())))
        accepted = any(r.task_id == task for r in new)
        if not accepted:
            return
        assert pre is not None and job.stale_reports == stale
        state, seq, holder, cur_attempt = pre
        # only the holder, or a newer delivery of the current dispatch whose start was not seen
        assert state in (D, R) and attempt == cur_attempt
        assert seq == fencing.seq_of(tok) and tok >= (holder or 0), (pre, tok)
        self.outcomes[(task, fencing.seq_of(tok))] += 1
        assert self.outcomes[(task, fencing.seq_of(tok))] == 1, "two outcomes accepted for one dispatch"
        self.live.pop(fencing.seq_of(tok), None)  # the worker acknowledges its message

    @rule(worker=st.sampled_from(WORKERS))
    def worker_lost(self, worker: str) -> None:
        self.settle(self.s.worker_lost(worker))

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        mine = [(t, tok) for w, t, tok, _ in self.got if w == worker]
        for f in self.s.ledger.heartbeat_fences(heartbeat(worker, *mine)):
            e = self.entry(f.task_id)
            seq = fencing.seq_of(f.token)
            holds = e is not None and e.state == R and e.seq == seq
            if f.ack:  # an ack must never end a live holder's lease
                assert not holds, f
                self.live.pop(seq, None)
            else:
                assert holds and e is not None and f.token < (e.token or 0), f
            assert e is None or e.token != f.token or e.state != R, "the holder was fenced"
            self.got = [g for g in self.got if not (g[0] == worker and g[2] == f.token)]

    @rule(task=st.sampled_from((None, *TASKS)))
    def cancel(self, task: str | None) -> None:
        if task is not None and self.s.ledger.is_pruned(J):
            return  # a known bug: test_ledger.py::test_cancel_of_a_task_of_a_pruned_job_changes_nothing
        self.settle(self.s.cancel(task))

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.settle(self.s.tick(self.s.now + dt))

    @rule(dead=st.booleans(), classes=st.none() | st.lists(st.sampled_from(list(FailureClass)), max_size=3))
    def retry(self, dead: bool, classes: list[FailureClass] | None) -> None:
        if self.s.ledger.is_pruned(J):
            last = {r.task_id: r for r in self.s.records}
            self.s.ledger.reload(J, last.values())
        self.s.now += 0.001
        out = self.s.retry(at=self.s.now, include_dead=dead, failures=classes)
        self.settle(out, reopen=True)

    @rule()
    def restart(self) -> None:
        before = {t: self.entry(t) for t in TASKS}
        snapshot = {
            t: None if e is None else (e.state, e.attempt, e.seq, e.token, e.worker)
            for t, e in before.items()
        }
        self.settle(self.s.restart())
        for t in TASKS:
            e = self.entry(t)
            if e is not None:
                assert snapshot[t] == (e.state, e.attempt, e.seq, e.token, e.worker), t

    # -- invariants ----------------------------------------------------------------------------------------------
    @invariant()
    def counts_match_entries(self) -> None:
        job = self.s.ledger.jobs.get(J)
        if job is None or job.pruned:
            return
        states = Counter(e.state for e in job.tasks.values())
        assert {s: n for s, n in job.counts.items() if n} == dict(states)
        assert all(n >= 0 for n in job.counts.values())
        assert job.submitted == len(job.tasks)
        fails = Counter(
            str(e.failure) for e in job.tasks.values() if e.state in (TaskState.FAILED, TaskState.DEAD)
        )
        assert job.record().failures == dict(fails)
        assert (job.finished_at is not None) == (job.done == len(TASKS) == job.submitted)

    @invariant()
    def no_task_is_lost(self) -> None:
        for t in TASKS:
            e = self.entry(t)
            if e is None or e.state in TERMINAL:
                continue
            if e.state == Q and e.waiting:
                raise AssertionError(f"{t} waits though the shell releases into free slots at once")
            if e.state == S or (e.state == Q and e.dispatch == 0):
                assert e.not_before is not None, t  # a timer will dispatch it
            else:
                assert e.seq in self.live, (t, e.state, e.seq)  # its message is on the queue
            if e.state == R:
                assert e.worker is not None and e in self.s.ledger.held_by(e.worker)


LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LEDGER_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase


def test_machine_world_starts_empty() -> None:
    m = LedgerMachine()
    assert m.live == {} and m.got == [] and m.s.ledger.jobs[J].total == len(TASKS)
    assert m.s.now == T0
