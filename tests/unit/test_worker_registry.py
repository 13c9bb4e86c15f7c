"""The held-delivery registry: self-fencing, pauses, heartbeat replies, with a fake clock."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from fleet.core.records import Fence, HeldTask
from fleet.worker.registry import Commit, PublishWatch, Registry

LEASE = 10.0
BEAT = 1.0
T0 = 1000.0


@pytest.fixture
def reg() -> Registry:
    return Registry(lease_s=LEASE, interval_s=BEAT, now=T0)


def fence(token: int, ack: bool = True) -> Fence:
    return Fence(job_id="j", task_id=f"t{token}", token=token, reason="newer holder", ack=ack)


def test_added_delivery_is_listed_renewable_and_committable(reg: Registry) -> None:
    h = reg.add(5001, "j", "t1", "$JS.ACK.x", now=T0)
    assert 5001 in reg and len(reg) == 1
    assert reg.beat() == (0, [HeldTask(job_id="j", task_id="t1", token=5001)])
    assert reg.renewable() == [h]
    assert reg.commit(h, T0 + 0.1) is Commit.GO
    assert reg.alive(h, T0 + 0.1)


def test_delivery_without_a_task_name_is_held_but_not_listed(reg: Registry) -> None:
    reg.add(7001, None, None, "$JS.ACK.x", now=T0)
    assert reg.beat() == (0, [])
    assert len(reg.renewable()) == 1


def test_self_fence_after_eight_tenths_of_the_lease_without_confirmation(reg: Registry) -> None:
    h = reg.add(1001, "j", "t1", "r", now=T0)
    assert reg.expire(T0 + 0.8 * LEASE) == []
    assert reg.alive(h, T0 + 0.8 * LEASE)
    lost = reg.expire(T0 + 0.8 * LEASE + 0.01)
    assert lost == [h] and h.lost and h.gone
    assert "fenced itself" in h.reason
    assert 1001 not in reg and reg.renewable() == []
    assert reg.commit(h, T0 + 9) is Commit.GONE
    assert not reg.alive(h, T0 + 9)
    assert reg.expire(T0 + 100) == []  # reported once


def test_renewals_push_the_self_fence_back(reg: Registry) -> None:
    h = reg.add(1001, "j", "t1", "r", now=T0)
    for k in range(1, 20):  # renewed every lease/4: never fenced
        reg.renewed(h, T0 + k * LEASE / 4)
        assert reg.expire(T0 + k * LEASE / 4 + 0.5) == []
    reg.renewed(h, T0)  # a late confirmation never moves last_ok back
    assert h.last_ok == T0 + 19 * LEASE / 4


def test_only_stale_deliveries_are_self_fenced(reg: Registry) -> None:
    old = reg.add(1001, "j", "a", "r", now=T0)
    new = reg.add(2001, "j", "b", "r", now=T0 + 5)
    assert reg.expire(T0 + 9) == [old]
    assert not new.gone and 2001 in reg


def test_a_gap_between_ticks_marks_every_held_delivery_unconfirmed(reg: Registry) -> None:
    a = reg.add(1001, "j", "a", "r", now=T0)
    b = reg.add(2001, "j", "b", "r", now=T0)
    assert not reg.tick(T0 + 2.5 * BEAT)  # exactly the limit: not a pause
    assert reg.tick(T0 + 2.5 * BEAT + 2.6 * BEAT)
    assert reg.gaps == 1 and reg.epoch == 1
    now = T0 + 5.2
    assert reg.commit(a, now) is Commit.WAIT and reg.commit(b, now) is Commit.WAIT
    assert reg.alive(a, now), "an unconfirmed delivery keeps renewing its lease"
    # a delivery fetched after the pause needs no confirmation
    c = reg.add(3001, "j", "c", "r", now=now)
    assert reg.commit(c, now) is Commit.GO


def test_regular_ticks_are_not_a_pause(reg: Registry) -> None:
    h = reg.add(1001, "j", "a", "r", now=T0)
    for now in itertools.accumulate(itertools.repeat(0.25, 40), initial=T0):
        assert not reg.tick(now)
    assert reg.commit(h, T0 + 10) is Commit.GO


def test_a_stale_pulse_is_treated_as_a_pause_in_progress(reg: Registry) -> None:
    """The worker loop may resume before the pulse thread notices the pause: it must wait."""
    h = reg.add(1001, "j", "a", "r", now=T0)
    reg.tick(T0 + 1)
    assert reg.commit(h, T0 + 1 + 2.5 * BEAT) is Commit.GO
    assert reg.commit(h, T0 + 1 + 2.6 * BEAT) is Commit.WAIT
    reg.tick(T0 + 1 + 2.6 * BEAT)  # the pulse catches up: now it is a real pause
    assert reg.commit(h, T0 + 1 + 2.7 * BEAT) is Commit.WAIT


def test_reply_confirms_what_its_heartbeat_listed(reg: Registry) -> None:
    a = reg.add(1001, "j", "a", "r", now=T0)
    b = reg.add(2001, "j", "b", "r", now=T0)
    reg.tick(T0 + 10)
    epoch, held = reg.beat()
    assert epoch == 1 and {t.token for t in held} == {1001, 2001}
    assert reg.apply_reply(epoch, [1001], []) == []
    assert reg.commit(a, T0 + 10.1) is Commit.GO
    assert reg.commit(b, T0 + 10.1) is Commit.WAIT, "not listed in that heartbeat"


def test_reply_to_a_heartbeat_sent_before_a_later_pause_confirms_nothing(reg: Registry) -> None:
    a = reg.add(1001, "j", "a", "r", now=T0)
    reg.tick(T0 + 10)
    epoch, held = reg.beat()
    reg.tick(T0 + 20)  # paused again while the request was out
    reg.apply_reply(epoch, [t.token for t in held], [])
    assert reg.commit(a, T0 + 20.1) is Commit.WAIT


def test_fences_mark_drop_and_return_the_deliveries(reg: Registry) -> None:
    a = reg.add(1001, "j", "a", "r", now=T0)
    b = reg.add(2001, "j", "b", "r", now=T0)
    fenced = reg.apply_reply(0, [1001, 2001], [fence(1001, ack=False), fence(9999)])
    assert fenced == [a]
    assert a.fenced and not a.fence_ack and a.reason == "newer holder" and a.gone
    assert 1001 not in reg and reg.commit(a, T0) is Commit.GONE
    assert [t.token for t in reg.beat()[1]] == [2001]
    assert reg.commit(b, T0) is Commit.GO
    # a fence repeated by the next reply changes nothing
    assert reg.apply_reply(0, [2001], [fence(1001)]) == []


def test_a_lost_delivery_is_not_fenced_again(reg: Registry) -> None:
    h = reg.add(1001, "j", "a", "r", now=T0)
    reg.expire(T0 + 100)
    assert h.lost
    assert reg.apply_reply(0, [], [fence(1001)]) == []
    assert not h.fenced


def test_drop_is_idempotent(reg: Registry) -> None:
    h = reg.add(1001, "j", "a", "r", now=T0)
    reg.drop(1001)
    reg.drop(1001)
    assert len(reg) == 0 and reg.commit(h, T0) is Commit.GONE


# ---- publishing health ------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()


def test_idle_publisher_is_never_stalled(clock: Clock) -> None:
    watch = PublishWatch(clock)
    assert watch.oldest() is None
    assert not watch.stalled(T0 + 1e6, last_ack=0.0, limit=8.0)


def test_publisher_is_stalled_only_while_something_waits_too_long(clock: Clock) -> None:
    watch = PublishWatch(clock)
    with watch.track():
        assert watch.oldest() == T0
        # the last PubAck was long ago, but this publish just started
        assert not watch.stalled(T0 + 8.0, last_ack=T0 - 100, limit=8.0)
        assert watch.stalled(T0 + 8.1, last_ack=T0 - 100, limit=8.0)
        # a PubAck for something else since: healthy again
        assert not watch.stalled(T0 + 8.1, last_ack=T0 + 5, limit=8.0)
    assert not watch.stalled(T0 + 100, last_ack=T0 - 100, limit=8.0)


def test_tracking_ends_on_errors(clock: Clock) -> None:
    watch = PublishWatch(clock)
    with pytest.raises(RuntimeError), watch.track():
        raise RuntimeError("publish failed")
    assert watch.oldest() is None
