"""Heartbeats and lease renewals from a place a busy handler cannot starve.

The pulse is a thread with its own asyncio loop and its own NATS connection, so a handler that
blocks the worker's event loop (or floods its connection) cannot delay a heartbeat or a ``+WPI``.
Three coroutines run on that loop:

* **beats**, every ``interval_s``: a :class:`Heartbeat` listing the held deliveries, sent as a
  core-NATS request to ``fleet.hb.<worker>``. The :class:`HeartbeatReply` fences deliveries this
  worker must stop (they are dropped from the registry, acked when the fence says so, and handed
  to the worker loop to be cancelled) and confirms the rest. No reply (scheduler down) is fine.
* **renewals**, every ``min(lease / 4, 15)`` seconds: ``+WPI`` to each held message as a request;
  the server's (empty) answer is the confirmation that moves the delivery's ``last_ok``. A worker
  whose publisher is stalled stops renewing, so its tasks go to workers that can report.
* **watch**, every few hundred milliseconds: notices pauses (``Registry.tick``) and self-fences
  deliveries whose lease was not confirmed in time (``Registry.expire``).

Work for the worker loop is handed over with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS

from broker import names
from broker.connection import connect, shutdown
from fleet.core.records import Heartbeat, HeartbeatReply, Resources
from fleet.worker.registry import Held, Registry

log = logging.getLogger("fleet.worker")


class PulseSink(Protocol):
    """What the pulse tells the worker; called on the worker's loop."""

    def on_fenced(self, held: list[Held]) -> None: ...
    def on_lost(self, held: list[Held]) -> None: ...
    def on_confirmed(self) -> None: ...
    def on_pulse_failed(self, exc: BaseException) -> None: ...


Status = Callable[[], tuple[int, int, bool]]
"""(slots, busy, stopping), read from the worker for each heartbeat."""


class Pulse:
    def __init__(
        self,
        url: str,
        worker_id: str,
        queue: str,
        registry: Registry,
        sink: PulseSink,
        loop: asyncio.AbstractEventLoop,
        *,
        status: Status,
        stalled: Callable[[float], bool],
        interval_s: float,
        lease_s: float,
        resources: Resources | None = None,
    ) -> None:
        self.url = url
        self.resources = resources
        self.worker_id = worker_id
        self.queue = queue
        self.registry = registry
        self.sink = sink
        self.loop = loop
        self.status = status
        self.stalled = stalled
        self.interval_s = interval_s
        self.renew_s = min(lease_s / 4, 15.0)
        self.renew_timeout = min(2.0, max(0.1, self.renew_s))
        self.reply_timeout = min(max(0.1, interval_s), 5.0)
        self.tick_s = max(0.01, min(0.25, interval_s / 4, lease_s / 20))
        self.subject = names.heartbeat_subject(worker_id)
        self.beats = 0
        self.replies = 0
        self.renewals = 0
        self.renew_failures = 0
        self._stop = threading.Event()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name=f"fleet-pulse-{worker_id}", daemon=True)
        self._was_stalled = False
        self._known = False
        """The last reply knew this worker (a new worker is unknown until its first heartbeat lands)."""
        self._host = socket.gethostname()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: NATS | None = None

    # -- called from the worker loop -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread; return once its connection is up (raise if it cannot connect)."""
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def confirm(self, token: int, timeout: float = 5.0) -> bool | None:
        """Send a heartbeat now and wait for its reply: True if the scheduler confirms ``token`` as its
        task's holder, False if it fenced it, None when it cannot tell yet (no answer, or the start
        report not applied yet). Call from any thread but the pulse's own."""
        loop, nc = self._loop, self._nc
        if loop is None or nc is None or threading.current_thread() is self._thread:
            return None
        fut = asyncio.run_coroutine_threadsafe(self._beat(nc), loop)
        try:
            reply = fut.result(timeout)
        except Exception:
            fut.cancel()
            return None
        if reply is None:
            return None
        if token not in self.registry or any(f.token == token for f in reply.fence):
            return False  # fenced: a definite no
        return True if token in reply.confirmed else None  # not yet seen as started: ask again

    def request(self, subject: str, data: bytes, timeout: float) -> bytes | None:
        """A request/reply on the pulse's connection from any other thread; None on no answer."""
        loop, nc = self._loop, self._nc
        if loop is None or nc is None or threading.current_thread() is self._thread:
            return None
        fut = asyncio.run_coroutine_threadsafe(nc.request(subject, data, timeout=timeout), loop)
        try:
            return fut.result(timeout + 1.0).data
        except Exception:
            fut.cancel()
            return None

    async def stop(self, timeout: float = 3.0) -> None:
        """Send a last heartbeat (``stopping``), close the connection, end the thread."""
        self._stop.set()
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(self._done), timeout)

    # -- the thread ------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                log.exception("pulse thread failed")
                self._post(self.sink.on_pulse_failed, exc)
        finally:
            if not self._done.done():
                self._done.set_result(None)

    async def _run(self) -> None:
        nc = await connect(self.url, name=f"fleet-pulse-{self.worker_id}")
        self._loop, self._nc = asyncio.get_running_loop(), nc
        self._ready.set_result(None)
        try:
            async with asyncio.TaskGroup() as tg:
                beats = tg.create_task(self._beats(nc))
                renewals = tg.create_task(self._renewals(nc))
                await self._watch()
                beats.cancel()
                renewals.cancel()
            await self._beat(nc, final=True)
        finally:
            await shutdown(nc, timeout=1.0)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the worker loop is gone: nothing left to tell
            self.loop.call_soon_threadsafe(fn, *args)

    async def _watch(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self.registry.tick(now):
                log.warning(
                    "worker %s was paused (no pulse for over %.1fs): held tasks wait for the scheduler "
                    "to confirm them before reporting",
                    self.worker_id,
                    self.registry.gap_s,
                )
            lost = self.registry.expire(now)
            if lost:
                for h in lost:
                    log.warning("task %s/%s (token %d): %s", h.job_id, h.task_id, h.token, h.reason)
                self._post(self.sink.on_lost, lost)
            await asyncio.sleep(self.tick_s)

    async def _beats(self, nc: NATS) -> None:
        due = time.monotonic()
        while True:
            await self._beat(nc)
            due += self.interval_s
            now = time.monotonic()
            due = max(due, now)
            await asyncio.sleep(due - now)

    async def _beat(self, nc: NATS, *, final: bool = False) -> HeartbeatReply | None:
        epoch, held = self.registry.beat()
        slots, busy, stopping = self.status()
        hb = Heartbeat(
            worker_id=self.worker_id,
            queue=self.queue,
            host=self._host,
            pid=os.getpid(),
            slots=slots,
            busy=busy,
            held=held,
            at=time.time(),
            interval_s=self.interval_s,
            stopping=stopping or final,
            resources=self.resources,
        )
        self.beats += 1
        timeout = min(self.reply_timeout, 0.5) if final else self.reply_timeout
        try:
            msg = await nc.request(self.subject, hb.to_wire(), timeout=timeout)
        except Exception as exc:  # no scheduler, or a slow one: keep going
            log.debug("heartbeat of %s unanswered: %s", self.worker_id, exc or type(exc).__name__)
            return None
        try:
            reply = HeartbeatReply.from_wire(msg.data)
        except ValueError as exc:
            log.warning("ignoring unreadable heartbeat reply: %s", exc)
            return None
        self.replies += 1
        if not reply.known and self._known:
            log.warning("the scheduler had declared worker %s lost; its tasks went to others", self.worker_id)
        self._known = reply.known
        fenced = self.registry.apply_reply(epoch, [t.token for t in held], reply.fence)
        if fenced:
            for h in fenced:
                log.info("task %s/%s (token %d) fenced: %s", h.job_id, h.task_id, h.token, h.reason)
            self._post(self.sink.on_fenced, fenced)
            await asyncio.gather(*(self._ack(nc, h) for h in fenced if h.fence_ack))
        self._post(self.sink.on_confirmed)
        return reply

    async def _ack(self, nc: NATS, h: Held) -> None:
        try:
            await nc.request(h.reply, b"+ACK", timeout=self.renew_timeout)
        except Exception as exc:  # the scheduler fences a redelivery again if it comes back
            log.debug("ack of fenced token %d failed: %s", h.token, exc or type(exc).__name__)

    async def _renewals(self, nc: NATS) -> None:
        due = time.monotonic()
        while True:
            due += self.renew_s
            now = time.monotonic()
            due = max(due, now)
            await asyncio.sleep(due - now)
            if self.stalled(time.monotonic()):
                if not self._was_stalled:
                    log.error(
                        "worker %s cannot publish (no PubAck for too long): it stops renewing its leases "
                        "so its tasks go to other workers",
                        self.worker_id,
                    )
                self._was_stalled = True
                continue
            self._was_stalled = False
            held = self.registry.renewable()
            if held:
                await asyncio.gather(*(self._renew(nc, h) for h in held))

    async def _renew(self, nc: NATS, h: Held) -> None:
        sent = time.monotonic()
        try:
            await nc.request(h.reply, b"+WPI", timeout=self.renew_timeout)
        except Exception as exc:
            self.renew_failures += 1
            log.debug("lease renewal of token %d failed: %s", h.token, exc or type(exc).__name__)
            return
        self.renewals += 1
        self.registry.renewed(h, sent)
