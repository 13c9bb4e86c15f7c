"""broker.reader against a real stream: replaying history and counting messages by subject."""

from __future__ import annotations

from conftest import Stack, count

from broker import names, reader


async def _publish_events(stack: Stack) -> None:
    fleet = await stack.connect()
    for task in ("t1", "t2", "t3"):
        for kind in ("state", "log"):
            await fleet.js.publish(names.event_subject("j-a", task, kind), f"{task}-{kind}".encode())
    await fleet.js.publish(names.event_subject("j-b", "t1", "state"), b"other-job")


async def test_replay_filters_by_subject(stack: Stack) -> None:
    await _publish_events(stack)
    js = stack.client.js

    every = [m.data async for m in reader.replay(js, names.EVENTS_STREAM, names.job_events_filter("j-a"))]
    assert every == [b"t1-state", b"t1-log", b"t2-state", b"t2-log", b"t3-state", b"t3-log"]
    states = [
        m.data async for m in reader.replay(js, names.EVENTS_STREAM, names.job_state_history_filter("j-a"))
    ]
    assert states == [b"t1-state", b"t2-state", b"t3-state"]
    none = [m async for m in reader.replay(js, names.EVENTS_STREAM, names.job_events_filter("j-none"))]
    assert none == []
    assert await count(js, names.EVENTS_STREAM, names.job_state_history_filter("j-a")) == 3


async def test_count_counts_only_matching_subjects(stack: Stack) -> None:
    """Regression: count() once returned the whole stream's message count."""
    await _publish_events(stack)
    js = stack.client.js
    assert await reader.count(js, names.EVENTS_STREAM, names.job_state_history_filter("j-a")) == 3
