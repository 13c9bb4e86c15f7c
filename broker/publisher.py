"""JetStream publishing with bounded windows and no silent hangs.

nats-py's ``publish_async`` never resolves its future when the server rejects a message
(jetstream.md pitfall 13), so every wait here is bounded; on a timeout the message is published
again synchronously with the same ``Nats-Msg-Id``, which either stores it or reports the duplicate
(the outcome the lost acknowledgement would have told us).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from nats.js import JetStreamContext, api
from nats.js.errors import APIError

log = logging.getLogger("fleet.broker")

ACK_TIMEOUT = 5.0


class PublishError(RuntimeError):
    """The server did not store a message (and says why)."""


Outgoing = tuple[str, bytes, str | None]
"""(subject, body, Nats-Msg-Id or None)"""


def _headers(msg_id: str | None) -> dict[str, str] | None:
    return {api.Header.MSG_ID: msg_id} if msg_id else None


class Publisher:
    def __init__(self, js: JetStreamContext, *, ack_timeout: float = ACK_TIMEOUT) -> None:
        self.js = js
        self.ack_timeout = ack_timeout

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> api.PubAck:
        """Publish one message and wait for the server to store it."""
        acks = await self.publish_many([(subject, data, msg_id)])
        return acks[0]

    async def publish_many(self, items: Iterable[Outgoing]) -> list[api.PubAck]:
        """Publish a batch without a round trip per message; return when all are stored."""
        batch = list(items)
        futs = [await self.js.publish_async(s, d, headers=_headers(m)) for s, d, m in batch]
        acks: list[api.PubAck] = []
        for (subject, data, msg_id), fut in zip(batch, futs, strict=True):
            try:
                acks.append(await asyncio.wait_for(fut, self.ack_timeout))
            except (TimeoutError, APIError) as exc:
                log.debug("async publish to %s unresolved (%s); retrying synchronously", subject, exc)
                acks.append(await self._sync(subject, data, msg_id))
        return acks

    async def _sync(self, subject: str, data: bytes, msg_id: str | None) -> api.PubAck:
        try:
            return await self.js.publish(subject, data, timeout=self.ack_timeout, headers=_headers(msg_id))
        except APIError as exc:
            raise PublishError(f"server refused message on {subject}: {exc.description or exc}") from None

    async def fire(self, subject: str, data: bytes) -> None:
        """Publish best-effort (progress and log events): no wait for the server's ack."""
        fut = await self.js.publish_async(subject, data)
        fut.add_done_callback(_swallow)


def _swallow(fut: asyncio.Future[api.PubAck]) -> None:
    if not fut.cancelled():
        fut.exception()
