"""FLEET_FAULTS parsing and the injector's before/after behaviour."""

from __future__ import annotations

import pytest

from broker.publisher import PublishError
from fleet.scheduler.faults import POINTS, Faults


def test_no_spec_injects_nothing() -> None:
    f = Faults("")
    for point in POINTS:
        f.before(point)
        f.after(point)
    assert f.injected == 0


def test_a_certain_fault_fails_every_time_half_before_half_after() -> None:
    f = Faults("dispatch=2.0", seed=1)  # p/2 >= 1: both sides always fail
    with pytest.raises(PublishError, match="injected fault before dispatch") as info:
        f.before("dispatch")
    assert info.value.transient
    with pytest.raises(PublishError, match="after dispatch"):
        f.after("dispatch")
    f.before("state")  # other points untouched
    assert f.injected == 2


def test_probability_is_roughly_honoured() -> None:
    f = Faults("state=0.5", seed=3)
    hits = 0
    for _ in range(2000):
        try:
            f.before("state")
        except PublishError:
            hits += 1
    assert 380 < hits < 620  # p/2 = 0.25 on each side


@pytest.mark.parametrize("spec", ["dispatch=x", "bogus=0.1"])
def test_a_bad_spec_is_a_clear_error(spec: str) -> None:
    with pytest.raises(ValueError):
        Faults(spec)
