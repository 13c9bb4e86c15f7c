"""Rate-limit tokens for calls inside a handler (``ctx.rate_limit("api-x", n)``).

The scheduler owns every limiter's bucket; a worker keeps a small local pool per limiter, filled
by *leases*: a request/reply on ``fleet.ctl.tokens.<limiter>`` grants some tokens that lapse after
``lease_s`` (unused ones are lost, so nobody hoards them and 200 workers together stay within the
rate). The pool asks for about what its handlers used in the last lease, at least what the caller
needs. While the scheduler does not answer, callers wait: the safe direction.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from broker import names
from fleet.core.records import TokenGrant, TokenRequest

Request = Callable[[str, bytes, float], bytes | None]


class RateLimitError(RuntimeError):
    """Tokens could not be had within the caller's timeout."""


@dataclasses.dataclass
class _Pool:
    tokens: float = 0.0
    expires: float = 0.0
    used: float = 0.0
    """Tokens taken since the last refill: the size of the next request."""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class TokenPools:
    def __init__(self, worker_id: str, request: Request, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker_id, self.request, self.clock = worker_id, request, clock
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Lock()

    def _pool(self, limiter: str) -> _Pool:
        with self._lock:
            return self._pools.setdefault(limiter, _Pool())

    def take(self, limiter: str, n: float = 1.0, timeout: float | None = None) -> None:
        """Block until ``n`` tokens of ``limiter`` are had (the calling thread only)."""
        names.check_token(limiter, "limiter")
        if n <= 0:
            return
        deadline = None if timeout is None else self.clock() + timeout
        pool = self._pool(limiter)
        with pool.lock:  # one refill at a time per limiter; other callers wait their turn
            while True:
                now = self.clock()
                if pool.expires <= now:
                    pool.tokens = 0.0
                if pool.tokens >= n:
                    pool.tokens -= n
                    pool.used += n
                    return
                wait = self._refill(limiter, pool, max(n - pool.tokens, pool.used, 1.0))
                if deadline is not None and self.clock() + wait > deadline and pool.tokens < n:
                    raise RateLimitError(f"no {n:g} tokens of {limiter} within {timeout}s")
                if wait > 0:
                    time.sleep(wait)

    def throttled(self, limiter: str, retry_after: float | None = None) -> None:
        """The upstream refused a call (HTTP 429): the scheduler slows the limiter down for everyone."""
        req = TokenRequest(
            limiter=limiter, want=1.0, worker_id=self.worker_id, throttled=True, retry_after_s=retry_after
        )
        self.request(names.tokens_subject(limiter), req.to_wire(), 2.0)
        pool = self._pool(limiter)
        with pool.lock:
            pool.tokens = 0.0  # what is left was granted at the old rate

    def _refill(self, limiter: str, pool: _Pool, want: float) -> float:
        """Ask for a lease; return how long to wait before asking again (0 if tokens came)."""
        req = TokenRequest(limiter=limiter, want=want, worker_id=self.worker_id)
        raw = self.request(names.tokens_subject(limiter), req.to_wire(), 2.0)
        if raw is None:
            return 0.5  # the scheduler is away: wait, never guess
        grant = TokenGrant.from_wire(raw)
        pool.used = 0.0
        if grant.granted > 0:
            pool.tokens += grant.granted
            pool.expires = self.clock() + grant.lease_s
            return 0.0
        return max(0.005, min(grant.retry_in_s, 1.0))
