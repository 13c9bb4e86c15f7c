"""Worker liveness from heartbeats, under an injected monotonic clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.core.liveness import WorkerTable, WorkerView
from fleet.core.records import Heartbeat, HeldTask


def hb(worker: str, interval: float = 1.0, **kw: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "worker_id": worker,
        "queue": "default",
        "host": "host-a",
        "pid": 42,
        "slots": 4,
        "busy": 1,
        "held": [],
        "at": 0.0,
        "interval_s": interval,
    }
    fields.update(kw)
    return Heartbeat.model_validate(fields)


def ids(views: list[WorkerView]) -> list[str]:
    return [v.worker_id for v in views]


def test_beat_records_the_view() -> None:
    table = WorkerTable()
    held = [HeldTask(job_id="j", task_id="a", token=1001), HeldTask(job_id="j", task_id="b", token=2001)]
    assert (
        table.beat(hb("w1", interval=2.0, queue="gpu", busy=2, held=held, stopping=True), now=100.0) is False
    )
    (view,) = table.alive()
    assert view == WorkerView(
        worker_id="w1",
        queue="gpu",
        host="host-a",
        pid=42,
        slots=4,
        busy=2,
        held=2,
        last_seen=100.0,
        interval_s=2.0,
        stopping=True,
    )
    assert table.beat(hb("w1"), now=101.0) is True
    assert table.alive()[0].held == 0 and table.alive()[0].last_seen == 101.0


def test_expire_after_missed_intervals() -> None:
    table = WorkerTable(missed=2.5)
    table.beat(hb("fast", interval=1.0), now=0.0)
    table.beat(hb("slow", interval=10.0), now=0.0)
    assert table.deadline(table.workers["fast"]) == 2.5
    assert table.expire(2.5) == []  # exactly at the deadline: still alive
    (lost,) = table.expire(2.51)
    assert lost.worker_id == "fast"
    assert ids(table.alive()) == ["slow"]
    assert table.expire(25.0) == []
    assert ids(table.expire(25.01)) == ["slow"]
    assert table.alive() == []


def test_a_lost_worker_that_beats_again_is_new() -> None:
    table = WorkerTable(missed=2.0)
    table.beat(hb("w1"), now=0.0)
    table.expire(10.0)
    assert table.beat(hb("w1"), now=10.0) is False
    assert table.beat(hb("w1"), now=11.0) is True


def test_heartbeats_keep_a_worker_alive() -> None:
    table = WorkerTable(missed=2.5)
    for t in range(0, 100, 2):
        table.beat(hb("w1"), now=float(t))
        assert table.expire(t + 2.4) == []
    assert ids(table.expire(98 + 2.6)) == ["w1"]


def test_grace_moves_every_deadline() -> None:
    table = WorkerTable(missed=2.5)
    table.beat(hb("w1"), now=0.0)
    table.beat(hb("w2"), now=1.0)
    table.grace(10.0)  # the scheduler itself was deaf for 10 s
    assert table.expire(12.5) == []
    assert ids(table.expire(12.6)) == ["w1"]
    assert ids(table.expire(13.6)) == ["w2"]


def test_refresh_gives_everyone_a_full_deadline_from_now() -> None:
    table = WorkerTable(missed=2.5)
    table.beat(hb("old"), now=0.0)
    table.beat(hb("future"), now=50.0)
    table.refresh(40.0)
    assert table.workers["old"].last_seen == 40.0
    assert table.workers["future"].last_seen == 50.0  # never moved back
    assert table.expire(42.5) == []
    assert ids(table.expire(42.6)) == ["old"]


def test_seeded_worker_is_lost_unless_it_beats() -> None:
    table = WorkerTable(missed=2.5)
    table.seed("ghost", now=100.0)
    table.seed("back", now=100.0, interval_s=2.0)
    assert "ghost" in table.workers
    assert table.beat(hb("back", interval=2.0), now=101.0) is True  # known from the state of record
    assert ids(table.expire(102.6)) == ["ghost"]
    assert ids(table.alive()) == ["back"]


def test_seed_never_replaces_a_worker_heard_from() -> None:
    table = WorkerTable()
    table.beat(hb("w1", busy=3), now=5.0)
    table.seed("w1", now=1.0)
    view = table.workers["w1"]
    assert (view.busy, view.last_seen) == (3, 5.0)


def test_alive_is_sorted() -> None:
    table = WorkerTable()
    for w in ("w3", "w1", "w2"):
        table.beat(hb(w), now=0.0)
    assert ids(table.alive()) == ["w1", "w2", "w3"]


@pytest.mark.parametrize("interval", [0.2, 1.0, 5.0])
def test_deadline_scales_with_the_workers_own_interval(interval: float) -> None:
    table = WorkerTable(missed=3.0)
    table.beat(hb("w", interval=interval), now=0.0)
    assert table.deadline(table.workers["w"]) == pytest.approx(3.0 * interval)


@settings(max_examples=100, deadline=None)
@given(
    beats=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 5)), max_size=30),
    check=st.floats(0, 200),
)
def test_expire_returns_exactly_the_silent_workers(beats: list[tuple[str, float]], check: float) -> None:
    table = WorkerTable(missed=2.5)
    now = 0.0
    last: dict[str, float] = {}
    for w, dt in beats:
        now += dt
        table.beat(hb(w), now=now)
        last[w] = now
    at = now + check
    lost = ids(table.expire(at))
    assert sorted(lost) == sorted(w for w, t in last.items() if at > t + 2.5)
    assert sorted(ids(table.alive())) == sorted(w for w, t in last.items() if at <= t + 2.5)
