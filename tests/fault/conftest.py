"""Fault rounds against real processes (nats-server, ``fleet scheduler``, ``fleet worker``).

Every round runs through :mod:`clients.cli.chaos` (the same code as ``fleet chaos``) on a fresh
fleet under the test's ``tmp_path``; each process logs there, and a failing round's report names the
directory. ``FAULT_OPTIONS`` keeps one round to a few seconds (3 workers, 30 short tasks).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from clients.cli.chaos import Options, RoundResult, run_round

FAULT_OPTIONS = Options(tasks=30, workers=3, concurrency=3, seconds=0.2, timeout=45.0)
REQUEUE_LIMIT_S = 6.0
"""A lost worker's tasks run elsewhere within this (loss declared ~2.5 s after the last heartbeat)."""
RunRound = Callable[[str], Awaitable[RoundResult]]


@pytest.fixture
def one_round(tmp_path: Path) -> RunRound:
    """Runs one round of a fault under ``tmp_path`` and prints what it found (shown on failure)."""

    async def run(fault: str) -> RoundResult:
        result = await run_round(fault, tmp_path / fault, FAULT_OPTIONS)
        print(result.summary())
        return result

    return run
