"""The waiting room and its policies, driven through the pure ledger in simulated time.

A small simulation plays the I/O shell and the workers: the ledger releases tasks into a runway,
workers with a fixed number of slots take them in order, run them for their duration and report.
Properties (Hypothesis): a quota is never exceeded, no slot is idle while eligible work waits,
equal weights share the slots fairly (Jain >= 0.95), and the lowest QoS class is served within its
bound.
"""

from __future__ import annotations

import collections
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.core import fencing
from fleet.core.effects import Dispatch
from fleet.core.ledger import Ledger
from fleet.core.records import (
    DoneReport,
    JobSpec,
    Payload,
    PrioritizeRequest,
    StartedTask,
    StartReport,
    TaskEnvelope,
)
from fleet.core.states import TaskState
from fleet.policy import config
from fleet.policy.fairshare import jain

T0 = 1_000_000.0


def _policy(text: str = "", **runway: float) -> config.Policy:
    p = config.load(text)
    return p.model_copy(
        update={"runway": config.RunwayPolicy(headroom=0, min_headroom=0, ahead_s=0, **runway)}
    )


@dataclasses.dataclass
class Sim:
    """The ledger with a runway, workers with ``slots`` slots, and a clock."""

    policy: config.Policy
    slots: int = 4
    now: float = T0
    ledger: Ledger = dataclasses.field(default_factory=Ledger)
    runway: collections.deque[tuple[str, str, int]] = dataclasses.field(default_factory=collections.deque)
    running: dict[tuple[str, str], tuple[float, int]] = dataclasses.field(default_factory=dict)
    durations: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    seq: int = 0
    intake: int = 0
    starts: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    peak: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    busy_time: dict[str, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    idle_with_work: int = 0

    def __post_init__(self) -> None:
        self.ledger.configure(self.policy, self.now)

    def job(self, job: str, tenant: str, qos: str | None = None, project: str | None = None) -> None:
        spec = JobSpec(job_id=job, tenant=tenant, qos=qos, project=project, created_at=self.now)
        self.ledger.declare(spec, self.now)

    def submit(self, job: str, task: str, tenant: str, seconds: float = 1.0, priority: int = 5) -> None:
        self.intake += 1
        env = TaskEnvelope(
            job_id=job,
            task_id=task,
            handler="m:f",
            payload=Payload(size=1, data=b"\xc0"),
            tenant=tenant,
            priority=priority,
            created_at=self.now,
        )
        self.durations[(job, task)] = seconds
        self.ledger.admit(env, self.now, intake_seq=self.intake)

    def tenant(self, job: str) -> str:
        return self.ledger.jobs[job].tenant

    def step(self, dt: float) -> None:
        """Finish what is due, release, start what fits, then let ``dt`` pass."""
        for key, (end, token) in sorted(self.running.items(), key=lambda kv: kv[1][0]):
            if end <= self.now:
                del self.running[key]
                job, task = key
                report = DoneReport(
                    job_id=job, task_id=task, attempt=1, delivery=1, token=token, worker_id="w",
                    outcome="succeeded", result=Payload(size=1, data=b"\xc0"),
                    started_at=end - self.durations[key], finished_at=end,
                )  # fmt: skip
                self.ledger.done(report, self.now)
        for eff in self.ledger.release(self.now, {"default": self.slots}):
            if isinstance(eff, Dispatch):
                self.seq += 1
                self.ledger.dispatched(eff.job_id, eff.task_id, eff.dispatch, self.seq)
                self.runway.append((eff.job_id, eff.task_id, self.seq))
        self.ledger.take_states(self.now)
        self.ledger.take_jobs()
        while self.runway and len(self.running) < self.slots:
            job, task, seq = self.runway.popleft()
            token = fencing.make(seq, 1)
            started = StartedTask(job_id=job, task_id=task, attempt=1, delivery=1, token=token)
            self.ledger.started(StartReport(worker_id="w", at=self.now, tasks=[started]), self.now)
            self.running[(job, task)] = (self.now + self.durations[(job, task)], token)
            self.starts.append((self.now, job, task))
        per_tenant = collections.Counter(self.tenant(j) for j, _ in self.running)
        for t, n in per_tenant.items():
            self.peak[t] = max(self.peak[t], n)
            self.busy_time[t] += n * dt
        if len(self.running) < self.slots and self._eligible_waiting():
            self.idle_with_work += 1
        self.now += dt

    def _eligible_waiting(self) -> bool:
        room, gate = self.ledger.room, self.ledger.gate
        qnode = room.queues.get("default")
        if qnode is None:
            return False
        return any(
            t.n and gate.tenant_block(name, self.now) is None
            for c in qnode.kids.values()
            for name, t in c.kids.items()
        )

    def run(self, seconds: float, dt: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(dt)


def test_quota_case_50_of_100_run_and_the_rest_start_as_the_first_finish() -> None:
    sim = Sim(_policy("tenants: {lab-a: {max_running: 50}}"), slots=200)
    sim.job("j", "lab-a")
    for i in range(100):
        sim.submit("j", f"t{i}", "lab-a", seconds=10)
    sim.step(1.0)
    assert len(sim.running) == 50 and sim.ledger.jobs["j"].counts[TaskState.QUEUED] == 50
    sim.ledger.explain(sim.now, {"default": 200})
    assert sim.ledger.jobs["j"].waiting == "quota lab-a 50/50"
    sim.run(10.0)
    assert sim.peak["lab-a"] == 50
    assert len(sim.starts) == 100 and sim.ledger.jobs["j"].counts.get(TaskState.QUEUED, 0) == 0


def test_urgent_tenant_b_goes_before_a_backlog_of_a() -> None:
    sim = Sim(_policy(), slots=10)
    sim.job("a", "tenant-a", qos="backfill")
    for i in range(10_000):
        sim.submit("a", f"t{i}", "tenant-a", seconds=5)
    sim.run(2.0)
    sim.job("b", "tenant-b", qos="urgent")
    for i in range(10):
        sim.submit("b", f"u{i}", "tenant-b", seconds=5)
    before = len(sim.starts)
    sim.run(6.0)  # one runway drain
    b_starts = [s for s in sim.starts[before:] if s[1] == "b"]
    assert len(b_starts) == 10, sim.starts[before:]


def test_priority_orders_within_a_tenant_and_can_be_changed() -> None:
    sim = Sim(_policy(), slots=1)
    sim.job("j", "t")
    for i in range(5):
        sim.submit("j", f"low{i}", "t", priority=1)
    sim.submit("j", "high", "t", priority=9)
    sim.step(0.1)
    assert sim.starts[-1][2] == "high"
    req = PrioritizeRequest(job_id="j", request_id="r", priority=9, task_ids=["low4"], at=sim.now)
    sim.ledger.prioritize(req, sim.now)
    sim.run(1.5)
    assert [s[2] for s in sim.starts[:2]] == ["high", "low4"]


def test_weights_split_slots_two_to_one() -> None:
    sim = Sim(_policy("tenants: {a: {weight: 2}, b: {weight: 1}}"), slots=30)
    for t in ("a", "b"):
        sim.job(t, t)
        for i in range(3000):
            sim.submit(t, f"x{i}", t, seconds=2)
    sim.run(60.0)
    ratio = sim.busy_time["a"] / sim.busy_time["b"]
    assert 1.8 <= ratio <= 2.2, ratio


def test_policy_change_while_running_applies_at_the_next_pick() -> None:
    sim = Sim(_policy("tenants: {a: {max_running: 2}}"), slots=10)
    sim.job("j", "a")
    for i in range(20):
        sim.submit("j", f"t{i}", "a", seconds=100)
    sim.step(1.0)
    assert len(sim.running) == 2
    sim.ledger.configure(_policy("tenants: {a: {max_running: 5}}"), sim.now)
    sim.step(1.0)
    assert len(sim.running) == 5


def test_max_pending_refuses_submissions_beyond_it() -> None:
    sim = Sim(_policy("tenants: {a: {max_pending: 3}}"), slots=0)
    sim.job("j", "a")
    for i in range(5):
        sim.submit("j", f"t{i}", "a")
    counts = sim.ledger.jobs["j"].counts
    assert counts[TaskState.QUEUED] == 3 and counts[TaskState.DEAD] == 2
    entry = sim.ledger.task("j", "t4")
    assert entry is not None and entry.reason is not None and "max_pending 3" in entry.reason


def test_no_workers_says_so() -> None:
    sim = Sim(_policy(), slots=0)
    sim.job("j", "a")
    sim.submit("j", "t", "a")
    sim.ledger.explain(sim.now, {})
    assert sim.ledger.jobs["j"].waiting == "no workers for queue default"


tenants = st.sampled_from(["a", "b", "c"])


@settings(max_examples=40, deadline=None)
@given(
    quota=st.integers(1, 6),
    slots=st.integers(1, 12),
    work=st.lists(st.tuples(tenants, st.floats(0.2, 5.0), st.integers(0, 9)), min_size=1, max_size=60),
)
def test_quota_never_exceeded_and_no_idle_slot_while_eligible_work_waits(
    quota: int, slots: int, work: list[tuple[str, float, int]]
) -> None:
    sim = Sim(_policy(f"tenants: {{a: {{max_running: {quota}}}}}"), slots=slots)
    for t in ("a", "b", "c"):
        sim.job(t, t)
    for i, (t, secs, prio) in enumerate(work):
        sim.submit(t, f"x{i}", t, seconds=secs, priority=prio)
    sim.run(sum(s for _, s, _ in work) + 5)
    assert sim.peak["a"] <= quota
    assert sim.idle_with_work == 0
    assert len(sim.starts) == len(work)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 4), slots=st.integers(2, 16), secs=st.floats(0.5, 3.0))
def test_equal_weights_are_fair(n: int, slots: int, secs: float) -> None:
    sim = Sim(_policy(), slots=slots)
    names_ = [f"t{i}" for i in range(n)]
    for t in names_:
        sim.job(t, t)
        for i in range(int(200 * slots / n / secs) + 10):
            sim.submit(t, f"x{i}", t, seconds=secs)
    sim.run(100.0, dt=0.25)
    assert jain([sim.busy_time[t] for t in names_]) >= 0.95


@settings(max_examples=15, deadline=None)
@given(bound=st.floats(5.0, 30.0), slots=st.integers(1, 4), secs=st.floats(0.5, 2.0))
def test_the_lowest_class_is_served_within_its_bound(bound: float, slots: int, secs: float) -> None:
    sim = Sim(
        _policy(
            f"qos: {{urgent: {{rank: 0}}, normal: {{rank: 1}}, backfill: {{rank: 2, max_wait: {bound}}}}}"
        ),
        slots=slots,
    )
    sim.job("hi", "a", qos="urgent")
    sim.job("lo", "b", qos="backfill")
    for i in range(2000):
        sim.submit("hi", f"x{i}", "a", seconds=secs)
    for i in range(20):
        sim.submit("lo", f"y{i}", "b", seconds=secs)
    sim.run(4 * bound, dt=0.25)
    lo = [at for at, job, _ in sim.starts if job == "lo"]
    assert lo, "backfill never ran"
    gaps = [b - a for a, b in zip([T0, *lo], lo, strict=False)]
    assert max(gaps) <= bound + secs + 0.5, gaps  # one slot frees within a task's runtime
