"""CPU/GPU-hour budgets: charges, periods, warnings once per threshold, hold, and the KV form."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.policy.budget import Account, Budgets, period_bounds, period_index
from fleet.policy.config import TenantPolicy

DAY = 86400.0
START = 1_767_225_600.0  # 2026-01-01, the default budget_start


def test_warns_at_each_threshold_once_then_holds() -> None:
    p = TenantPolicy(cpu_hours=10, warn_at=(0.8, 0.95))
    b = Budgets()
    now = START + 5 * DAY
    seen = []
    for _ in range(12):  # 12 x 1 CPU-hour
        seen += [(n.threshold, n.held) for n in b.charge("a", p, 1, 0, 3600, now)]
    assert seen == [(0.8, False), (0.95, False), (1.0, True)]
    status = b.status("a", p, now)
    assert status.held and status.reason == "budget a cpu-hours 12.0/10"


def test_warn_only_never_holds_and_a_new_period_starts_from_zero() -> None:
    b = Budgets()
    warn = TenantPolicy(gpu_hours=1, on_budget="warn", period=30 * DAY)
    notices = b.charge("a", warn, 1, 2, 3600, START + DAY)
    assert [n.threshold for n in notices] == [0.8, 0.95, 1.0] and not any(n.held for n in notices)
    assert not b.status("a", warn, START + DAY).held
    hold = TenantPolicy(gpu_hours=1, period=30 * DAY)
    assert b.status("a", hold, START + DAY).held
    assert not b.status("a", hold, START + 31 * DAY).held  # next period
    assert [n.threshold for n in b.charge("a", hold, 1, 2, 3600, START + 31 * DAY)] == [0.8, 0.95, 1.0]


def test_usage_rows_by_day_and_round_trip() -> None:
    b = Budgets()
    p = TenantPolicy()
    b.charge("a", p, 2, 0, 1800, START + 0.5 * DAY)
    b.charge("a", p, 1, 1, 3600, START + 1.5 * DAY)
    b.charge("b", p, 1, 0, 3600, START + 1.5 * DAY)
    rows = b.usage("a")
    assert [(r["day"], r["cpu_hours"], r["gpu_hours"], r["tasks"]) for r in rows] == [
        ("2026-01-01", 1.0, 0.0, 1),
        ("2026-01-02", 1.0, 1.0, 1),
    ]
    assert [r["tenant"] for r in b.usage(since=START + DAY)] == ["a", "b"]
    dirty = b.take_dirty()
    assert set(dirty) == {"a", "b"} and b.take_dirty() == {}
    again = Budgets()
    again.load("a", dirty["a"])
    assert again.accounts["a"] == b.accounts["a"]


def test_malformed_account_names_the_problem() -> None:
    for bad in ([], {"cpu_s": "lots"}, {"days": {"2026-01-01": ["x"]}}):
        try:
            Account.from_dict(bad)
        except ValueError as exc:
            assert str(exc).startswith("usage account")
        else:
            raise AssertionError(f"accepted {bad!r}")


@settings(max_examples=60, deadline=None)
@given(
    limit=st.floats(0.5, 50),
    charges=st.lists(st.tuples(st.floats(0, 40 * DAY), st.floats(0, 7200), st.floats(0.5, 8)), max_size=60),
)
def test_usage_sums_per_period_and_hold_iff_over(
    limit: float, charges: list[tuple[float, float, float]]
) -> None:
    p = TenantPolicy(cpu_hours=limit, period=7 * DAY)
    b = Budgets()
    per_period: dict[int, float] = {}
    fired: dict[int, list[float]] = {}
    for at, secs, cpus in sorted(charges):
        now = START + at
        k = period_index(p, now)
        before = per_period.get(k, 0.0)
        per_period[k] = before + secs * cpus / 3600
        for n in b.charge("t", p, cpus, 0, secs, now):
            assert before < n.threshold * limit <= per_period[k] + 1e-9  # crossed by this charge
            fired.setdefault(k, []).append(n.threshold)
        assert abs(b.accounts["t"].used("cpu-hours") - per_period[k]) < 1e-6
        assert b.status("t", p, now).held == (per_period[k] >= limit)
        start, end = period_bounds(p, now)
        assert start <= now < end
    for thresholds in fired.values():
        assert len(thresholds) == len(set(thresholds))  # each at most once per period
