"""Reading stream history: the last message per subject, or everything from the start."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError


class ReplayStalled(TimeoutError):
    """A replay stopped receiving messages before it reached the end of the stream."""


async def replay(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    last_per_subject: bool = False,
    headers_only: bool = False,
    idle_timeout: float = 30.0,
) -> AsyncIterator[Msg]:
    """Yield the stored messages matching ``subject`` (oldest first), then stop.

    Uses one ordered consumer and stops when the server says nothing is pending, never on a
    quiet gap: a gap longer than ``idle_timeout`` (a leader election, a stalled server) raises
    :class:`ReplayStalled` rather than returning a partial history.
    """
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except NotFoundError:
        return
    if not info.state.messages:
        return
    policy = api.DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else api.DeliverPolicy.ALL
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        deliver_policy=policy,
        headers_only=headers_only or None,
    )
    try:
        ci = await sub.consumer_info()
        if not (ci.num_pending or 0) + (ci.delivered.consumer_seq if ci.delivered else 0):
            return
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except TimeoutError:
                raise ReplayStalled(
                    f"replay of {subject} in {stream} stalled for {idle_timeout:.0f}s"
                ) from None
            yield msg
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):  # the connection may be gone already
            await sub.unsubscribe()


async def count(js: JetStreamContext, stream: str, subject: str) -> int:
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except NotFoundError:
        return 0
    return sum((info.state.subjects or {}).values())


def stream_seq(msg: Msg) -> int:
    """A JetStream message's stream sequence, read straight from its ack subject (the full
    ``msg.metadata`` parse costs more than a cheap admission)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5])
    return msg.metadata.sequence.stream  # the longer form, with domain and account hash
