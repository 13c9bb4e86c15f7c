"""A lean pull consumer for a durable JetStream consumer (the scheduler's inputs).

nats-py's ``PullSubscription.fetch`` awaits every message of a batch separately (a task and a
timeout per message): about 53 us a message on a 2-vCPU VM, more than everything the scheduler
does with a submission. This one sends the same pull requests (``$JS.API.CONSUMER.MSG.NEXT``) and
lets one inbox subscription's callback append what arrives to a buffer, so a batch costs one wait.

``fetch(n, timeout)`` returns what is buffered at once if there is any; else it asks for up to
``n`` messages without waiting (``no_wait``), and if none are there, with a long poll of
``timeout``; it returns as soon as messages come (those still on their way arrive in the buffer
and are returned by the next call, in order) and raises :class:`TimeoutError` if none come. The
messages are ordinary JetStream messages: ``ack()``, ``in_progress()`` and ``metadata`` work.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

STATUS = "Status"
SETTLE_S = 0.002
"""Once messages come, how long a quiet moment ends the wait for the rest of the batch."""


class Puller:
    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: deque[Msg] = deque()
        self.requests = 0
        self.ended: set[str] = set()
        """Pull requests (by reply token) the server has closed with a status, not yet waited for."""
        self.last_status: str | None = None
        self._changed = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> Puller:
        self._sub = await self.nc.subscribe(
            f"{self.inbox}.*", cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status and not msg.data:
            self.ended.add(msg.subject.rpartition(".")[2])
            self.last_status = f"{status} {msg.headers.get('Description', '') if msg.headers else ''}".strip()
        else:
            self.buffer.append(msg)
        self._changed.set()

    async def _request(self, batch: int, *, no_wait: bool, expires_s: float = 0.0) -> str:
        """Send a pull request; its reply token (the server's closing status names it)."""
        self.requests += 1
        token = str(self.requests)
        if len(self.ended) > 1000:  # statuses of requests nobody waits for any more
            self.ended.clear()
        body: dict[str, object] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires_s * 1e9)
        await self.nc.publish(self.subject, json.dumps(body).encode(), reply=f"{self.inbox}.{token}")
        return token

    async def _wait(self, batch: int, request: str, deadline: float) -> None:
        """Until a message is buffered (or ``request`` ended, or the deadline); then while more
        keep coming at once, until ``batch`` are buffered or the request ended."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self.buffer) >= batch or request in self.ended:
                self.ended.discard(request)
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, SETTLE_S) if self.buffer else left)
            except TimeoutError:
                if self.buffer:
                    return  # nothing more for a moment: the rest comes with the next call

    def _take(self, batch: int) -> list[Msg]:
        out: list[Msg] = []
        while self.buffer and len(out) < batch:
            out.append(self.buffer.popleft())
        return out

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        if self._sub is None:
            raise RuntimeError("Puller.start() first")
        if not self.buffer:
            loop = asyncio.get_running_loop()
            request = await self._request(batch, no_wait=True)
            await self._wait(batch, request, loop.time() + max(1.0, timeout))
            if not self.buffer:
                request = await self._request(batch, no_wait=False, expires_s=timeout)
                await self._wait(batch, request, loop.time() + timeout + 0.5)
        msgs = self._take(batch)
        if not msgs:
            raise TimeoutError(f"no messages within {timeout}s ({self.last_status or 'no answer'})")
        return msgs
