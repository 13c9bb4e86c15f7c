"""One round of each fault (CI), and 20 rounds of each (``pytest -m chaos``, by hand).

A round passes when no task was lost or committed twice, every check of
:func:`clients.cli.chaos_harness.verify` held, and no process died that the round did not kill.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.cli.chaos import FAULTS, RESUME_LIMIT_S, run_chaos

from .conftest import REQUEUE_LIMIT_S, RunRound


@pytest.mark.fault
@pytest.mark.parametrize("fault", FAULTS)
async def test_one_round(fault: str, one_round: RunRound) -> None:
    result = await one_round(fault)

    assert result.ok, result.summary()
    assert result.tasks > 0
    if fault in ("kill-worker", "stop-worker"):
        assert result.latencies, "no held task was measured"
        assert max(result.latencies) < REQUEUE_LIMIT_S, result.latencies
    if fault == "kill-nats":
        assert result.resume_s is not None and result.resume_s < RESUME_LIMIT_S


@pytest.mark.chaos
@pytest.mark.timeout(4 * 3600)
def test_twenty_rounds_of_each_fault(tmp_path: Path) -> None:
    assert run_chaos(20, None, tmp_path / "chaos") == 0
