"""Failure classes and their budgets (fleet.core.failures)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.core import failures
from fleet.core.failures import ATTEMPT_CLASSES, Counters, FailureClass, decide
from fleet.core.records import RetryPolicy

FAST = settings(max_examples=200, deadline=None)
C = FailureClass
budgets = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 6),
    max_lost_leases=st.integers(1, 6),
    max_infra=st.integers(1, 6),
    max_preemptions=st.integers(1, 6),
)
counters = st.builds(
    Counters,
    attempt=st.integers(1, 8),
    lost=st.integers(0, 8),
    infra=st.integers(0, 8),
    preempted=st.integers(0, 8),
)


def test_classes() -> None:
    assert {c.value for c in C} == {
        "error",
        "timeout",
        "killed",
        "lost",
        "preempted",
        "infra",
        "invalid",
        "rejected",
    }
    assert frozenset({C.ERROR, C.TIMEOUT, C.KILLED}) == ATTEMPT_CLASSES
    assert C("lost") is C.LOST


def test_count_adds_to_the_class_budget_only() -> None:
    c = Counters()
    for cls in (C.LOST, C.LOST, C.INFRA, C.PREEMPTED, C.ERROR, C.TIMEOUT, C.KILLED, C.INVALID):
        failures.count(cls, c)
    assert (c.attempt, c.lost, c.infra, c.preempted) == (1, 2, 1, 1)


P = RetryPolicy(max_attempts=3, max_lost_leases=2, max_infra=4, max_preemptions=5)


@pytest.mark.parametrize(
    ("cls", "c", "action"),
    [
        (C.ERROR, Counters(attempt=1), "retry"),
        (C.ERROR, Counters(attempt=2), "retry"),
        (C.ERROR, Counters(attempt=3), "fail"),
        (C.TIMEOUT, Counters(attempt=3), "fail"),
        (C.KILLED, Counters(attempt=2), "retry"),
        (C.LOST, Counters(lost=1), "requeue"),
        (C.LOST, Counters(lost=2), "dead"),
        (C.PREEMPTED, Counters(preempted=4), "requeue"),
        (C.PREEMPTED, Counters(preempted=5), "fail"),
        (C.INFRA, Counters(infra=3), "retry"),
        (C.INFRA, Counters(infra=4), "fail"),
        (C.INVALID, Counters(), "dead"),
    ],
)
def test_decide_table(cls: FailureClass, c: Counters, action: str) -> None:
    verdict = decide(P, cls, c)
    assert verdict.action == action
    assert verdict.reason


def test_reasons_name_the_budget() -> None:
    assert decide(P, C.LOST, Counters(lost=2)).reason == "poison: lost its lease 2 times (limit 2)"
    assert decide(P, C.LOST, Counters(lost=1)).reason == "lease lost (1 of 2)"
    assert decide(P, C.ERROR, Counters(attempt=3)).reason == "attempt 3 of 3"
    assert decide(P, C.INFRA, Counters(infra=4)).reason == "4 infrastructure failures (limit 4)"
    assert decide(P, C.ERROR, Counters(), retryable=False).reason == "not retryable"


@pytest.mark.parametrize("cls", sorted(ATTEMPT_CLASSES))
def test_not_retryable_fails_attempt_classes_at_once(cls: FailureClass) -> None:
    assert decide(P, cls, Counters(attempt=1), retryable=False).action == "fail"


@FAST
@given(p=budgets, c=counters, retryable=st.booleans())
def test_only_its_own_budget_decides(p: RetryPolicy, c: Counters, retryable: bool) -> None:
    for cls in C:
        verdict = decide(p, cls, c, retryable=retryable)
        if cls in ATTEMPT_CLASSES:
            assert verdict.action in ("retry", "fail")
            assert (verdict.action == "retry") is (retryable and c.attempt < p.max_attempts)
        elif cls == C.LOST:
            assert verdict.action == ("dead" if c.lost >= p.max_lost_leases else "requeue")
        elif cls == C.PREEMPTED:
            assert verdict.action == ("fail" if c.preempted >= p.max_preemptions else "requeue")
        elif cls == C.INFRA:
            assert verdict.action == ("fail" if c.infra >= p.max_infra else "retry")
        else:
            assert verdict.action == "dead"


@FAST
@given(p=budgets, cls=st.sampled_from(list(C)))
def test_repeated_failures_end_after_exactly_the_budget(p: RetryPolicy, cls: FailureClass) -> None:
    """Fail the same way again and again, moving on as the ledger does, until a terminal verdict."""
    c = Counters()
    n = 0
    while True:
        n += 1
        failures.count(cls, c)
        verdict = decide(p, cls, c)
        if verdict.action in ("fail", "dead"):
            break
        if verdict.action == "retry" and cls in ATTEMPT_CLASSES:
            c.attempt += 1
        assert n < 1000
    expected = {
        C.ERROR: p.max_attempts,
        C.TIMEOUT: p.max_attempts,
        C.KILLED: p.max_attempts,
        C.LOST: p.max_lost_leases,
        C.PREEMPTED: p.max_preemptions,
        C.INFRA: p.max_infra,
        C.INVALID: 1,
        C.REJECTED: 1,
    }[cls]
    assert n == expected
    assert verdict.action == ("dead" if cls in (C.LOST, C.INVALID, C.REJECTED) else "fail")
    assert c.attempt == (expected if cls in ATTEMPT_CLASSES else 1)


def test_retry_policy_satisfies_budgets() -> None:
    b: failures.Budgets = RetryPolicy()
    assert (b.max_attempts, b.max_lost_leases, b.max_infra, b.max_preemptions) == (3, 3, 10, 100)
