"""Worker liveness under an injected clock."""

from __future__ import annotations

import pytest

from fleet.core.liveness import WorkerTable, WorkerView
from fleet.core.records import Heartbeat


def hb(worker: str, interval: float = 1.0, **kw: object) -> Heartbeat:
    fields: dict[str, object] = {
        "worker_id": worker,
        "queue": "default",
        "host": "host-a",
        "pid": 42,
        "slots": 4,
        "busy": 1,
        "tasks": ["j/t1"],
        "at": 0.0,
        "interval_s": interval,
    }
    fields.update(kw)
    return Heartbeat.model_validate(fields)


def test_beat_records_the_view() -> None:
    table = WorkerTable()
    table.beat(hb("w1", queue="gpu", busy=2, tasks=["j/a", "j/b", "j/a"], stopping=True), now=100.0)
    (view,) = table.alive()
    assert view == WorkerView(
        worker_id="w1",
        queue="gpu",
        host="host-a",
        pid=42,
        slots=4,
        busy=2,
        tasks=frozenset({"j/a", "j/b"}),
        last_seen=100.0,
        interval_s=1.0,
        stopping=True,
    )


def test_last_seen_is_the_local_clock_not_the_heartbeat_time() -> None:
    table = WorkerTable()
    table.beat(hb("w1", at=5.0), now=100.0)
    assert table.workers["w1"].last_seen == 100.0


def test_expiry_after_missed_intervals() -> None:
    table = WorkerTable(missed=3.0)
    table.beat(hb("w1", interval=2.0), now=100.0)
    assert table.expire(now=103.0) == []
    assert table.expire(now=106.0) == []  # exactly missed * interval: still alive
    assert [w.worker_id for w in table.alive()] == ["w1"]
    lost = table.expire(now=106.5)
    assert [w.worker_id for w in lost] == ["w1"]
    assert lost[0].last_seen == 100.0
    assert table.alive() == []
    assert table.expire(now=200.0) == []  # reported once only


def test_heartbeats_keep_a_worker_alive() -> None:
    table = WorkerTable(missed=3.0)
    for t in range(0, 100, 2):
        table.beat(hb("w1", interval=1.0), now=float(t))
        assert table.expire(now=t + 2.5) == []
    assert table.expire(now=98.0 + 3.5)[0].worker_id == "w1"


def test_each_worker_uses_its_own_interval() -> None:
    table = WorkerTable(missed=2.0)
    table.beat(hb("fast", interval=1.0), now=0.0)
    table.beat(hb("slow", interval=10.0), now=0.0)
    assert [w.worker_id for w in table.expire(now=5.0)] == ["fast"]
    assert [w.worker_id for w in table.alive()] == ["slow"]
    assert [w.worker_id for w in table.expire(now=20.5)] == ["slow"]


@pytest.mark.parametrize(
    ("missed", "alive_at", "dead_at"), [(1.0, 1.0, 1.01), (5.0, 5.0, 5.01), (0.5, 0.5, 0.6)]
)
def test_missed_is_configurable(missed: float, alive_at: float, dead_at: float) -> None:
    table = WorkerTable(missed=missed)
    table.beat(hb("w", interval=1.0), now=0.0)
    assert table.expire(now=alive_at) == []
    assert len(table.expire(now=dead_at)) == 1


def test_alive_sorted_and_multiple_lost() -> None:
    table = WorkerTable(missed=3.0)
    for name, t in [("w3", 0.0), ("w1", 0.0), ("w2", 10.0)]:
        table.beat(hb(name), now=t)
    assert [w.worker_id for w in table.alive()] == ["w1", "w2", "w3"]
    assert sorted(w.worker_id for w in table.expire(now=5.0)) == ["w1", "w3"]
    assert [w.worker_id for w in table.alive()] == ["w2"]


def test_a_lost_worker_that_returns_is_alive_again() -> None:
    table = WorkerTable(missed=3.0)
    table.beat(hb("w1"), now=0.0)
    assert len(table.expire(now=10.0)) == 1
    table.beat(hb("w1"), now=11.0)
    assert [w.worker_id for w in table.alive()] == ["w1"]
    assert table.expire(now=12.0) == []
