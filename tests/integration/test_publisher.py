"""broker.publisher against a real server: every outcome is an answer, nothing hangs or leaks."""

from __future__ import annotations

import pytest
from conftest import Stack, wait_for

from broker import names
from broker.publisher import Out, Publisher, PublishError


async def test_each_message_gets_its_own_outcome(stack: Stack) -> None:
    fleet = await stack.connect()
    pub = Publisher(fleet.nc, ack_timeout=1.0)
    subject = names.intake_task("j-pub", "t1")
    first, again, nowhere = await pub.publish_each(
        [Out(subject, b"\x80"), Out(subject, b"\x80"), Out("fleet.nowhere.x", b"\x80")]
    )
    assert not isinstance(first, PublishError) and first.seq > 0
    # the task store keeps one message per subject and refuses a second one: read as "already there"
    assert not isinstance(again, PublishError) and again.duplicate
    # no stream: no responders, answered at once (not after a timeout) and transient
    assert isinstance(nowhere, PublishError) and nowhere.transient and nowhere.code == 503


async def test_a_refusal_is_permanent_and_named(stack: Stack) -> None:
    fleet = await stack.connect()
    js = fleet.js
    await js.add_stream(name="TINY", subjects=["tiny.>"], max_msg_size=16)
    pub = Publisher(fleet.nc, ack_timeout=1.0)
    with pytest.raises(PublishError) as info:
        await pub.publish("tiny.x", b"x" * 64)
    assert not info.value.transient and "server refused" in str(info.value)
    assert not pub._futures, "a refused publish left its future behind"


async def test_duplicates_by_msg_id_are_reported(stack: Stack) -> None:
    fleet = await stack.connect()
    pub = Publisher(fleet.nc)
    a = await pub.publish(names.state_subject("j-pub", "t1"), b"\x80", msg_id="state:j-pub/t1:1")
    b = await pub.publish(names.state_subject("j-pub", "t1"), b"\x80", msg_id="state:j-pub/t1:1")
    assert b.duplicate and b.seq == a.seq


async def test_fire_and_forget_is_bounded(stack: Stack) -> None:
    fleet = await stack.connect()
    pub = Publisher(fleet.nc, ack_timeout=0.2, fire_limit=5)
    sent = [await pub.fire("fleet.nowhere.y", b"x") for _ in range(20)]  # no stream answers
    assert sent.count(True) <= 5 and pub.dropped >= 15
    # each unanswered fire is answered or forgotten within ack_timeout
    await wait_for(lambda: pub.fire_inflight == 0 and not pub._futures, timeout=2, what="fires settled")
    assert await pub.fire(names.event_subject("j", "t", names.EVENT_LOG), b"\x80")
