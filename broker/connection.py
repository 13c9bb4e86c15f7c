"""Connecting to NATS with settings fit for a fleet (see docs/architecture.md, "Connections").

nats-py's defaults give up reconnecting after 60 attempts and notice a dead TCP connection only
after minutes (jetstream.md pitfalls 17 and 18); fleet processes reconnect forever and ping often.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger("fleet.broker")

ENV_URL = "FLEET_NATS_URL"


async def connect(
    url: str,
    *,
    name: str = "fleet",
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 2.0,
    initial_timeout: float = 10.0,
) -> NATS:
    """Open a NATS connection that reconnects forever and detects dead peers in ~30 s."""

    async def error_cb(exc: Exception) -> None:
        # before the first connection, failures are reported once by the bounded wait below
        log.log(logging.WARNING if connected else logging.DEBUG, "nats error on %s: %s", name, exc)

    async def closed_cb() -> None:
        if on_closed is not None:
            await on_closed()

    async def reconnected_cb() -> None:
        log.info("%s reconnected to NATS", name)
        if on_reconnected is not None:
            await on_reconnected()

    connected = False
    servers = [u.strip() for u in url.split(",") if u.strip()]
    connecting = nats.connect(
        servers=servers,
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=10,
        max_outstanding_pings=3,
        allow_reconnect=True,
        error_cb=error_cb,
        closed_cb=closed_cb,
        reconnected_cb=reconnected_cb,
        pending_size=64 * 1024 * 1024,
    )
    try:  # reconnects are unlimited, so bound the *first* connection ourselves
        nc = await asyncio.wait_for(connecting, initial_timeout)
        connected = True
        return nc
    except TimeoutError:
        raise ConnectionError(f"cannot reach NATS at {url} within {initial_timeout:.0f}s") from None


def url_from_env() -> str | None:
    return os.environ.get(ENV_URL) or None


async def shutdown(nc: NATS, timeout: float = 5.0) -> None:
    """Flush what is buffered, then close. (``drain`` can hang on pull subscriptions.)"""
    if nc.is_closed:
        return
    try:
        await nc.flush(timeout=int(timeout))
    except Exception as exc:  # closing anyway
        log.debug("flush before close failed: %s", exc)
    await nc.close()
