"""The scheduling policy in JetStream: read at start, watched while running (KV ``fleet_policy``).

A policy file given at start (``fleet scheduler --policy FILE``) is checked and stored, so the
CLI's ``fleet policy show`` and every later scheduler see it; without one the stored policy is
used, or the defaults. A stored policy that does not parse is logged and ignored (the scheduler
keeps the one it has): a bad edit never stops scheduling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from broker import names
from fleet.policy.config import Policy, PolicyError, load, load_file

log = logging.getLogger("fleet.scheduler")


async def startup(js: JetStreamContext, path: str | None) -> Policy:
    kv = await js.key_value(names.POLICY_BUCKET)
    if path:
        policy = load_file(path)  # a bad file stops the start: the operator asked for it
        await kv.put(names.POLICY_KEY, policy.to_yaml().encode())
        log.info("policy from %s stored", path)
        return policy
    try:
        entry = await kv.get(names.POLICY_KEY)
    except (KeyNotFoundError, NotFoundError):
        return Policy()
    try:
        return load((entry.value or b"").decode("utf-8", "replace"), "stored policy")
    except PolicyError as exc:
        log.error("%s; using the defaults", exc)
        return Policy()


async def watch(js: JetStreamContext, apply: Callable[[Policy], None]) -> None:
    """Call ``apply`` with every valid new version of the stored policy, for ever."""
    while True:
        try:
            kv = await js.key_value(names.POLICY_BUCKET)
            watcher = await kv.watch(names.POLICY_KEY, include_history=False)
            async for entry in watcher:
                if entry is None or entry.operation in ("DEL", "PURGE"):
                    continue
                try:
                    apply(load((entry.value or b"").decode("utf-8", "replace"), "stored policy"))
                    log.info("policy revision %d applied", entry.revision)
                except PolicyError as exc:
                    log.error("%s; keeping the current policy", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected: watch again
            log.warning("policy watch failed (%s); retrying", exc)
            await asyncio.sleep(1.0)
