"""JetStream publishing that never hangs and never leaks.

nats-py's ``publish_async`` never resolves its future when the server *rejects* a message, and
each such future holds one of its 4,000 permits for ever (jetstream.md §3.2 item 1). So fleet
keeps its own reply mux: every publish carries a reply inbox of ours, every reply resolves its
future (a PubAck, or a :class:`PublishError` that names the server's reason), and every wait is
bounded. A whole window is waited for with one deadline; messages still unanswered are sent once
more, together, with the same ``Nats-Msg-Id`` (stored or reported as a duplicate: the outcome the
lost acknowledgement would have told us). Nothing is retried one message at a time.

Fire-and-forget publishes (:meth:`Publisher.fire`) are bounded too: at most ``fire_limit`` in
flight, each forgotten after ``ack_timeout``; beyond that they are dropped and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

log = logging.getLogger("fleet.broker")

ACK_TIMEOUT = 5.0
ERR_SUBJECT_FULL = 10077
"""'maximum messages per subject exceeded': a 1-per-subject record stream already holds this one."""


class PublishError(RuntimeError):
    """The server did not store a message. ``transient`` errors (no answer, no responders during an
    election, a lost connection) may succeed when tried again; the others will not."""

    def __init__(self, message: str, *, transient: bool, code: int = 0) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code


class Out(NamedTuple):
    subject: str
    data: bytes
    msg_id: str | None = None
    headers: dict[str, str] | None = None


Outgoing = Out | tuple[str, bytes, str | None]


def _out(item: Outgoing) -> Out:
    return item if isinstance(item, Out) else Out(*item)


class Publisher:
    def __init__(self, nc: NATS, *, ack_timeout: float = ACK_TIMEOUT, fire_limit: int = 10_000) -> None:
        self.nc = nc
        self.ack_timeout = ack_timeout
        self.fire_limit = fire_limit
        self.fire_inflight = 0
        self.dropped = 0
        self.last_ack = time.monotonic()
        """Monotonic time of the last message the server confirmed (publishing health)."""
        self._futures: dict[str, asyncio.Future[api.PubAck]] = {}
        self._ids = itertools.count()
        self._prefix = ""
        self._sub_lock = asyncio.Lock()

    # -- the reply mux ---------------------------------------------------------------------------
    async def _inbox(self) -> str:
        if not self._prefix:
            async with self._sub_lock:
                if not self._prefix:
                    prefix = self.nc.new_inbox()
                    await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                    self._prefix = prefix
        return f"{self._prefix}.{next(self._ids)}"

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._futures.pop(msg.subject, None)
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(
                PublishError("no JetStream stream answered (election?)", transient=True, code=503)
            )
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            fut.set_exception(PublishError(f"unreadable PubAck {msg.data[:80]!r}", transient=True))
            return
        err = resp.get("error")
        if err is None:
            self.last_ack = time.monotonic()
            fut.set_result(api.PubAck.from_response(resp))
        elif err.get("err_code") == ERR_SUBJECT_FULL:
            self.last_ack = time.monotonic()
            fut.set_result(api.PubAck(stream=resp.get("stream", ""), seq=0, duplicate=True))
        else:
            code = int(err.get("err_code") or err.get("code") or 0)
            fut.set_exception(
                PublishError(f"server refused: {err.get('description', err)}", transient=False, code=code)
            )

    async def _send(self, item: Out) -> tuple[str, asyncio.Future[api.PubAck]]:
        reply = await self._inbox()
        fut: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
        self._futures[reply] = fut
        headers = dict(item.headers or {})
        if item.msg_id:
            headers[api.Header.MSG_ID] = item.msg_id
        try:
            await self.nc.publish(item.subject, item.data, reply=reply, headers=headers or None)
        except Exception as exc:
            self._futures.pop(reply, None)
            transient = not isinstance(exc, ValueError) and "payload" not in str(exc).lower()
            fut.set_exception(PublishError(f"cannot publish to {item.subject}: {exc}", transient=transient))
        return reply, fut

    def _forget(self, reply: str) -> None:
        fut = self._futures.pop(reply, None)
        if fut is not None:
            fut.cancel()

    # -- acknowledged publishing --------------------------------------------------------------------
    async def publish(
        self, subject: str, data: bytes, msg_id: str | None = None, headers: dict[str, str] | None = None
    ) -> api.PubAck:
        """Publish one message and wait for the server to store it."""
        return (await self.publish_many([Out(subject, data, msg_id, headers)]))[0]

    async def publish_many(self, items: Iterable[Outgoing]) -> list[api.PubAck]:
        """Publish a window; return when every message is stored, else raise :class:`PublishError`."""
        results = await self.publish_each(items)
        errors = [r for r in results if isinstance(r, PublishError)]
        if errors:
            raise (
                errors[0]
                if len(errors) == 1
                else PublishError(
                    f"{len(errors)} of {len(results)} messages not stored; first: {errors[0]}",
                    transient=all(e.transient for e in errors),
                    code=errors[0].code,
                )
            )
        return [r for r in results if not isinstance(r, PublishError)]

    async def publish_each(self, items: Iterable[Outgoing]) -> list[api.PubAck | PublishError]:
        """Publish a window; one outcome per message, in order (a PubAck or why it was not stored)."""
        batch = [_out(i) for i in items]
        results: list[api.PubAck | PublishError | None] = [None] * len(batch)
        todo = list(range(len(batch)))
        for _ in range(2):
            sent = {i: await self._send(batch[i]) for i in todo}
            if sent:
                await asyncio.wait([f for _, f in sent.values()], timeout=self.ack_timeout)
            todo = []
            for i, (reply, fut) in sent.items():
                if not fut.done():
                    self._forget(reply)
                    results[i] = PublishError(f"no answer for {batch[i].subject}", transient=True)
                    todo.append(i)
                    continue
                exc = fut.exception()
                if exc is None:
                    results[i] = fut.result()
                    continue
                err = exc if isinstance(exc, PublishError) else PublishError(str(exc), transient=True)
                results[i] = err
                if err.transient:
                    todo.append(i)
            if not todo:
                break
            log.debug("%d of %d publishes not confirmed; sending them again", len(todo), len(batch))
        return [r if r is not None else PublishError("not sent", transient=True) for r in results]

    # -- best effort --------------------------------------------------------------------------------
    async def fire(self, subject: str, data: bytes) -> bool:
        """Publish without waiting (progress and log events). Returns False if it was dropped."""
        if self.fire_inflight >= self.fire_limit or not self.nc.is_connected:
            self.dropped += 1
            return False
        reply, fut = await self._send(Out(subject, data))
        self.fire_inflight += 1
        handle = asyncio.get_running_loop().call_later(self.ack_timeout, self._forget, reply)

        def done(f: asyncio.Future[api.PubAck]) -> None:
            self.fire_inflight -= 1
            handle.cancel()
            if not f.cancelled() and f.exception() is not None:
                self.dropped += 1

        fut.add_done_callback(done)
        return True
