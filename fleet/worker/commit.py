"""Storing a delivery's outcome and acknowledging its message, without ever doing either twice or late.

The order is always: the report is stored (PubAck), *then* the message is acked, so a crash in
between leaves a stored report and a redelivery the scheduler fences as "already finished". Each
step is bounded:

* a report is published with retries only while the delivery's lease is still being renewed, and
  for at most ``0.5 x lease`` (less at shutdown). A report that cannot be stored is given up: the
  delivery is dropped without an ack, so the scheduler or JetStream hands the task to someone else.
* after a pause (:mod:`fleet.worker.registry`) the report and the ack wait for the scheduler's
  next heartbeat reply; if none comes within half that time the report still goes out (the scheduler accepts it
  only from the task's holder) but the message is not acked, since a newer delivery of the same
  message may hold it.
* the ack is ``ack_sync`` with a short timeout; a failed ack is only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg

from broker.publisher import Out, Publisher, PublishError
from fleet.worker.registry import Commit, Held, PublishWatch, Registry

log = logging.getLogger("fleet.worker")

REPORT_BUDGET = 0.5
"""A report is tried for at most this fraction of the lease."""
ACK_TIMEOUT = 2.0
POLL_S = 0.05


class Committer:
    def __init__(
        self,
        pub: Publisher,
        registry: Registry,
        watch: PublishWatch,
        *,
        lease_s: float,
        exit_deadline: Callable[[], float],
    ) -> None:
        self.pub = pub
        self.registry = registry
        self.watch = watch
        self.lease_s = lease_s
        self.exit_deadline = exit_deadline
        self.given_up = 0
        self.ack_failures = 0

    def until(self) -> Callable[[], float]:
        """A deadline starting now: ``0.5 x lease`` away, or the shutdown deadline if sooner."""
        end = time.monotonic() + REPORT_BUDGET * self.lease_s
        return lambda: min(end, self.exit_deadline())

    async def store(self, item: Out, *, alive: Callable[[], bool], until: Callable[[], float]) -> bool:
        """Publish ``item`` until stored; False when ``alive()`` turns false or time runs out.
        A refusal by the server (not transient) is raised as :class:`PublishError`."""
        pause = POLL_S
        with self.watch.track():
            while True:
                left = until() - time.monotonic()
                if left <= 0 or not alive():
                    return False
                try:
                    async with asyncio.timeout(left):
                        await self.pub.publish(item.subject, item.data, item.msg_id, item.headers)
                    return True
                except TimeoutError:
                    return False
                except PublishError as exc:
                    if not exc.transient:
                        raise
                    log.debug("report to %s not stored yet: %s", item.subject, exc)
                except Exception as exc:  # connection trouble: the client reconnects by itself
                    log.debug("report to %s not sent: %s", item.subject, exc)
                await asyncio.sleep(max(0.0, min(pause, until() - time.monotonic())))
                pause = min(pause * 2, 1.0)

    async def wait_commit(self, held: Held, until: Callable[[], float]) -> Commit:
        """GO, GONE, or WAIT when the scheduler did not confirm the delivery before ``until``."""
        while True:
            state = self.registry.commit(held, time.monotonic())
            left = until() - time.monotonic()
            if state is not Commit.WAIT or left <= 0:
                return state
            await asyncio.sleep(min(POLL_S, left))

    async def finish(self, held: Held, msg: Msg, item: Out, fallback: Out | None = None) -> bool:
        """Store the final report ``item`` (or ``fallback`` if the server refuses it), then ack.
        Returns whether a report was stored."""
        until = self.until()
        half = time.monotonic() + (until() - time.monotonic()) / 2
        state = await self.wait_commit(held, lambda: min(half, until()))
        if state is Commit.GONE:
            return False
        if state is Commit.WAIT:
            log.warning("token %d: no confirmation from the scheduler; reporting without an ack", held.token)

        def alive() -> bool:
            return self.registry.alive(held, time.monotonic())

        try:
            stored = await self.store(item, alive=alive, until=until)
        except PublishError as exc:
            log.error("report to %s refused by the server: %s", item.subject, exc)
            stored = False
            if fallback is not None:
                with contextlib.suppress(PublishError):
                    stored = await self.store(fallback, alive=alive, until=until)
        if not stored:
            self.given_up += 1
            log.warning(
                "token %d: report to %s not stored in time; giving the task up (no ack)",
                held.token,
                item.subject,
            )
            return False
        if state is Commit.GO and await self.wait_commit(held, until) is Commit.GO:
            await self.ack(held, msg)
        return True

    async def ack(self, held: Held, msg: Msg) -> None:
        try:
            await msg.ack_sync(timeout=ACK_TIMEOUT)
        except Exception as exc:  # the scheduler fences a redelivery as "already finished"
            self.ack_failures += 1
            log.warning("ack of token %d failed: %s", held.token, exc or type(exc).__name__)

    async def best_effort(self, item: Out, timeout: float = 1.0) -> None:
        """One bounded try, no retries, errors ignored (the ``lost`` report of a self-fenced task)."""
        try:
            async with asyncio.timeout(timeout):
                await self.pub.publish(item.subject, item.data, item.msg_id, item.headers)
        except Exception as exc:
            log.debug("best-effort report to %s not stored: %s", item.subject, exc or type(exc).__name__)
