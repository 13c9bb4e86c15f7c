"""Storing a delivery's outcome, then acking it; and how a delivery is stopped. No server: the
publisher and the message are fakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from nats.aio.msg import Msg

from broker.publisher import Out, Publisher, PublishError
from fleet.core.records import Fence
from fleet.worker.commit import Committer
from fleet.worker.context import TaskContext, TaskInfo
from fleet.worker.delivery import Running, Stop
from fleet.worker.registry import Held, PublishWatch, Registry
from fleet.worker.slots import Slots

LEASE = 2.0  # reports are tried for 1 s
ITEM = Out("fleet.report.done.j.t", b"report", "done:j/t:1001")
FALLBACK = Out("fleet.report.done.j.t", b"fallback", "done:j/t:1001")


class FakePub:
    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[tuple[str, bytes, str | None]] = []

    async def publish(
        self, subject: str, data: bytes, msg_id: str | None = None, headers: Any = None
    ) -> None:
        self.sent.append((subject, data, msg_id))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome


class FakeMsg:
    def __init__(self, fail: bool = False) -> None:
        self.acks = 0
        self.fail = fail

    async def ack_sync(self, timeout: float = 1.0) -> None:
        self.acks += 1
        if self.fail:
            raise TimeoutError("no answer")


@pytest.fixture
def registry() -> Registry:
    return Registry(lease_s=LEASE, interval_s=0.2)


@pytest.fixture
def held(registry: Registry) -> Held:
    return registry.add(1001, "j", "t", "$JS.ACK.x", now=time.monotonic())


def committer(pub: FakePub, registry: Registry, exit_at: float = float("inf")) -> Committer:
    return Committer(
        cast(Publisher, pub), registry, PublishWatch(), lease_s=LEASE, exit_deadline=lambda: exit_at
    )


def ticking(registry: Registry) -> asyncio.Task[None]:
    """Stand-in for the pulse thread's ticks, so the registry does not see a stalled pulse."""

    async def tick() -> None:
        while True:
            registry.tick(time.monotonic())
            await asyncio.sleep(0.02)

    return asyncio.create_task(tick())


@pytest.fixture
async def pulse(registry: Registry) -> Any:
    task = ticking(registry)
    yield task
    task.cancel()


async def test_stored_then_acked(registry: Registry, held: Held, pulse: Any) -> None:
    pub, msg = FakePub(), FakeMsg()
    assert await committer(pub, registry).finish(held, cast(Msg, msg), ITEM)
    assert pub.sent == [(ITEM.subject, ITEM.data, ITEM.msg_id)] and msg.acks == 1


async def test_transient_errors_are_retried_with_the_same_msg_id(
    registry: Registry, held: Held, pulse: Any
) -> None:
    pub, msg = FakePub(PublishError("no answer", transient=True), ConnectionError("reconnecting")), FakeMsg()
    assert await committer(pub, registry).finish(held, cast(Msg, msg), ITEM)
    assert [s[2] for s in pub.sent] == [ITEM.msg_id] * 3 and msg.acks == 1


async def test_given_up_after_half_the_lease_without_an_ack(
    registry: Registry, held: Held, pulse: Any
) -> None:
    pub, msg = FakePub(*[PublishError("no answer", transient=True)] * 1000), FakeMsg()
    c = committer(pub, registry)
    started = time.monotonic()
    assert not await c.finish(held, cast(Msg, msg), ITEM)
    assert 0.5 * LEASE - 0.1 <= time.monotonic() - started < 0.5 * LEASE + 0.5
    assert msg.acks == 0 and c.given_up == 1


async def test_shutdown_deadline_cuts_the_retries_short(registry: Registry, held: Held, pulse: Any) -> None:
    pub, msg = FakePub(*[PublishError("no answer", transient=True)] * 1000), FakeMsg()
    started = time.monotonic()
    assert not await committer(pub, registry, exit_at=started + 0.2).finish(held, cast(Msg, msg), ITEM)
    assert time.monotonic() - started < 0.5


async def test_retries_stop_when_the_lease_is_lost(registry: Registry, held: Held, pulse: Any) -> None:
    pub, msg = FakePub(*[PublishError("no answer", transient=True)] * 1000), FakeMsg()
    registry.expire(time.monotonic() + LEASE)  # self-fenced meanwhile
    assert not await committer(pub, registry).finish(held, cast(Msg, msg), ITEM)
    assert pub.sent == [] and msg.acks == 0


async def test_refused_success_falls_back_to_a_failure_report(
    registry: Registry, held: Held, pulse: Any
) -> None:
    pub, msg = FakePub(PublishError("message too large", transient=False)), FakeMsg()
    assert await committer(pub, registry).finish(held, cast(Msg, msg), ITEM, FALLBACK)
    assert [s[1] for s in pub.sent] == [ITEM.data, FALLBACK.data] and msg.acks == 1


async def test_fenced_delivery_reports_nothing(registry: Registry, held: Held, pulse: Any) -> None:
    registry.apply_reply(0, [], [Fence(job_id="j", task_id="t", token=1001, reason="x", ack=True)])
    pub, msg = FakePub(), FakeMsg()
    assert not await committer(pub, registry).finish(held, cast(Msg, msg), ITEM)
    assert pub.sent == [] and msg.acks == 0


async def test_after_a_pause_report_waits_for_confirmation(
    registry: Registry, held: Held, pulse: Any
) -> None:
    registry.tick(time.monotonic() + 10)  # a pause: unconfirmed
    pub, msg = FakePub(), FakeMsg()
    finishing = asyncio.create_task(committer(pub, registry).finish(held, cast(Msg, msg), ITEM))
    await asyncio.sleep(0.2)
    assert pub.sent == [] and not finishing.done()
    epoch, listed = registry.beat()
    registry.apply_reply(epoch, [t.token for t in listed], [])
    assert await asyncio.wait_for(finishing, 2)
    assert len(pub.sent) == 1 and msg.acks == 1


async def test_unconfirmed_after_the_deadline_reports_but_does_not_ack(
    registry: Registry, held: Held, pulse: Any
) -> None:
    registry.tick(time.monotonic() + 10)
    pub, msg = FakePub(), FakeMsg()
    assert await committer(pub, registry).finish(held, cast(Msg, msg), ITEM)
    assert len(pub.sent) == 1 and msg.acks == 0


async def test_failed_ack_is_only_counted(registry: Registry, held: Held, pulse: Any) -> None:
    pub, msg = FakePub(), FakeMsg(fail=True)
    c = committer(pub, registry)
    assert await c.finish(held, cast(Msg, msg), ITEM)
    assert msg.acks == 1 and c.ack_failures == 1


async def test_best_effort_swallows_errors(registry: Registry) -> None:
    pub = FakePub(PublishError("refused", transient=False))
    await committer(pub, registry).best_effort(ITEM)
    assert len(pub.sent) == 1


# ---- stopping a delivery --------------------------------------------------------------------------------
@pytest.fixture
def running(registry: Registry) -> Iterator[Running]:
    held = registry.add(1001, "j", "t", "r", now=time.monotonic())
    info = TaskInfo("t", "j", 1, 1, "w", "default", token=1001)
    ctx = TaskContext(info, lambda f, m: None, lambda lvl, m: None)
    yield Running(held, cast(Msg, FakeMsg()), cast(Any, None), 1, ctx, started_at=time.time())
    ctx.close()


async def test_stronger_stop_reasons_win(running: Running) -> None:
    running.task = asyncio.create_task(asyncio.sleep(10))
    running.halt(Stop.CANCELLED, "user")
    assert running.stop is Stop.CANCELLED and running.ctx.cancelled and not running.ctx.fenced
    running.halt(Stop.PREEMPTED, "shutdown")
    assert (running.stop, running.reason) == (Stop.CANCELLED, "user")
    running.halt(Stop.FENCED, "newer holder")
    assert (running.stop, running.reason) == (Stop.FENCED, "newer holder") and running.ctx.fenced
    running.halt(Stop.LOST, "lease")
    assert running.stop is Stop.FENCED
    await asyncio.sleep(0)
    assert running.task.cancelled()


async def test_a_concluding_delivery_is_only_stopped_by_a_fence_or_a_lost_lease(running: Running) -> None:
    running.task = asyncio.create_task(asyncio.sleep(10))
    running.concluding = True
    running.halt(Stop.PREEMPTED, "shutdown")
    await asyncio.sleep(0)
    assert not running.task.done()
    running.halt(Stop.LOST, "lease")
    await asyncio.sleep(0)
    assert running.task.cancelled() and running.ctx.fenced


async def test_slots_release_once() -> None:
    slots = Slots(2)
    with slots.take() as slot:
        assert slots.free == 1
        slot.release()
        assert slots.free == 2
    assert slots.free == 2 and slots.busy == 0
