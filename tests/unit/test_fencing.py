"""Fencing tokens: one integer per delivery, growing with every dispatch and every redelivery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.core import fencing

FAST = settings(max_examples=200, deadline=None)
seqs = st.integers(0, 10**12)
deliveries = st.integers(1, fencing.BASE - 1)


def test_layout() -> None:
    assert fencing.BASE == 1000
    assert fencing.make(7, 2) == 7002
    assert (fencing.seq_of(7002), fencing.delivery_of(7002)) == (7, 2)
    assert fencing.make(123456, 1) == 123_456_001


@FAST
@given(seq=seqs, delivery=deliveries)
def test_round_trip(seq: int, delivery: int) -> None:
    tok = fencing.make(seq, delivery)
    assert fencing.seq_of(tok) == seq
    assert fencing.delivery_of(tok) == delivery
    assert fencing.describe(tok) == f"{seq}.{delivery}"


@pytest.mark.parametrize(("delivery", "kept"), [(0, 1), (-5, 1), (999, 999), (1000, 999), (10**6, 999)])
def test_delivery_is_clamped_into_its_field(delivery: int, kept: int) -> None:
    tok = fencing.make(42, delivery)
    assert (fencing.seq_of(tok), fencing.delivery_of(tok)) == (42, kept)


@FAST
@given(a=st.tuples(seqs, deliveries), b=st.tuples(seqs, deliveries))
def test_tokens_order_like_seq_then_delivery(a: tuple[int, int], b: tuple[int, int]) -> None:
    ta, tb = fencing.make(*a), fencing.make(*b)
    assert (ta < tb) is (a < b)
    assert (ta == tb) is (a == b)


@FAST
@given(seq=seqs, d1=st.integers(1, 10**6), d2=st.integers(1, 10**6))
def test_a_newer_dispatch_beats_any_delivery_of_an_older_one(seq: int, d1: int, d2: int) -> None:
    assert fencing.make(seq + 1, d1) > fencing.make(seq, d2)
    if d1 < d2:
        assert fencing.make(seq, d1) <= fencing.make(seq, d2)


def test_describe() -> None:
    assert fencing.describe(None) == "none"
    assert fencing.describe(fencing.make(5, 3)) == "5.3"
