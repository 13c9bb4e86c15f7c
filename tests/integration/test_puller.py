"""broker.puller against a real nats-server: batches in order, long polls, timeouts, acks."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from broker.connection import connect, shutdown
from broker.puller import Puller
from broker.server import EmbeddedServer


async def _setup(server: EmbeddedServer) -> tuple[NATS, JetStreamContext]:
    nc = await connect(server.url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="P", subjects=["p.>"]))
    await js.add_consumer(
        "P", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30)
    )
    return nc, js


async def test_batches_in_order_then_a_timeout(nats_server: EmbeddedServer) -> None:
    nc, js = await _setup(nats_server)
    try:
        for i in range(1200):
            await js.publish(f"p.{i}", str(i).encode())
        puller = await Puller(nc, "P", "c").start()
        seen: list[int] = []
        while len(seen) < 1200:
            msgs = await puller.fetch(512, timeout=1.0)
            assert 0 < len(msgs) <= 512
            seen += [int(m.data) for m in msgs]
            for m in msgs:
                await m.ack()
        assert seen == list(range(1200))
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            await puller.fetch(512, timeout=0.3)
        assert 0.25 <= time.monotonic() - t < 2.0
        info = await js.consumer_info("P", "c")
        assert info.num_ack_pending == 0 and info.num_pending == 0
        await puller.stop()
    finally:
        await shutdown(nc)


async def test_a_long_poll_returns_what_arrives(nats_server: EmbeddedServer) -> None:
    nc, js = await _setup(nats_server)
    try:
        puller = await Puller(nc, "P", "c").start()

        async def later() -> None:
            await asyncio.sleep(0.3)
            for i in range(3):
                await js.publish(f"p.{i}", b"x")

        task = asyncio.ensure_future(later())
        t = time.monotonic()
        got = await puller.fetch(10, timeout=5.0)
        got += [] if len(got) == 3 else await puller.fetch(10, timeout=1.0)
        assert len(got) == 3 and time.monotonic() - t < 3.0
        assert got[0].metadata.sequence.stream == 1
        await task
        await puller.stop()
    finally:
        await shutdown(nc)
