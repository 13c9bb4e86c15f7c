"""The scheduling policy in JetStream: read at start, watched while running (KV ``fleet_policy``).

A policy file given at start (``fleet scheduler --policy FILE``) is checked and stored, so the
CLI's ``fleet policy show`` and every later scheduler see it; without one the stored policy is
used, or the defaults. A stored policy that does not parse is logged and ignored (the scheduler
keeps the one it has): a bad edit never stops scheduling.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from broker import names
from fleet.policy.config import Policy, PolicyError, load, load_file
from fleet.policy.gate import Gate

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


FAIRSHARE_KEY = "fairshare"


async def load_usage(js: JetStreamContext, gate: Gate) -> int:
    """Usage accounting (budgets per tenant, decayed fair-share usage) as the last scheduler left it."""
    kv = await js.key_value(names.POLICY_BUCKET)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return 0
    n = 0
    for key in keys:
        if key != FAIRSHARE_KEY and not key.startswith("usage."):
            continue
        try:
            entry = await kv.get(key)
            data = json.loads(entry.value or b"{}")
            if key == FAIRSHARE_KEY:
                gate.share.load(data)
            else:
                gate.budgets.load(key.removeprefix("usage."), data)
                n += 1
        except (KeyNotFoundError, NotFoundError):
            continue
        except ValueError as exc:
            log.error("usage record %s is unreadable (%s); starting it from zero", key, exc)
    return n


async def save_usage(js: JetStreamContext, gate: Gate, now: float) -> None:
    """Write the accounts that changed (and fair-share usage) to KV."""
    dirty = gate.budgets.take_dirty()
    if not dirty:
        return
    kv = await js.key_value(names.POLICY_BUCKET)
    try:
        for tenant, data in dirty.items():
            await kv.put(names.usage_key(tenant), json.dumps(data).encode())
        await kv.put(FAIRSHARE_KEY, json.dumps(gate.share.to_dict(now)).encode())
    except Exception:
        gate.budgets.dirty.update(dirty)  # written next time
        raise
