"""Failure classification of worker errors, and reports that stay valid whatever a handler raised."""

from __future__ import annotations

import math
from concurrent.futures.process import BrokenProcessPool

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.blobs import BlobMissing
from broker.codec import DecodeError
from broker.publisher import PublishError
from fleet.core.failures import FailureClass
from fleet.core.records import MAX_DELAY_S, ErrorInfo
from fleet.worker import classify
from fleet.worker.errors import (
    CommandFailed,
    HandlerCrashed,
    HandlerNotAllowed,
    HandlerNotFound,
    InvalidInput,
    Permanent,
    Retry,
    TaskTimeout,
)

F = FailureClass


@pytest.mark.parametrize(
    ("exc", "phase", "failure", "retryable"),
    [
        (ValueError("boom"), "run", F.ERROR, True),
        (Permanent("never"), "run", F.ERROR, False),
        (Retry("later", delay_s=3), "run", F.ERROR, True),
        (TaskTimeout("slow"), "run", F.TIMEOUT, True),
        (TimeoutError("the handler's own timeout"), "run", F.ERROR, True),
        (CommandFailed("exit 3", 3), "run", F.ERROR, True),
        (CommandFailed("killed by SIGKILL", -9), "run", F.KILLED, True),
        (HandlerCrashed("child died"), "run", F.KILLED, True),
        (BrokenProcessPool("pool broken"), "run", F.KILLED, True),
        (HandlerNotFound("no module"), "run", F.INVALID, False),
        (HandlerNotAllowed("os:system"), "run", F.INVALID, False),
        (InvalidInput("not a map"), "run", F.INVALID, False),
        (DecodeError("bad msgpack"), "input", F.INVALID, False),
        (InvalidInput("not a map"), "input", F.INVALID, False),
        (BlobMissing("gone"), "input", F.INFRA, True),
        (ConnectionError("nats down"), "input", F.INFRA, True),
        (TypeError("cannot encode"), "result", F.ERROR, False),
        (PublishError("object store refused", transient=False), "result", F.INFRA, True),
        (TimeoutError(), "result", F.INFRA, True),
    ],
)
def test_classification(exc: BaseException, phase: classify.Phase, failure: F, retryable: bool) -> None:
    info = classify.error_info(exc, phase)
    assert info.failure == failure
    assert info.retryable is retryable
    assert info.message
    ErrorInfo.model_validate(info.model_dump())  # a valid record, round trip


def test_result_errors_are_named() -> None:
    assert classify.error_info(TypeError("x"), "result").type == "ResultNotSerializable"
    assert classify.error_info(OSError("x"), "result").type == "ResultNotStored"
    assert classify.error_info(ValueError("x")).type == "ValueError"


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (3, 3.0),
        (2.5, 2.5),
        (-1, 0.0),
        (float("nan"), 0.0),
        (float("inf"), MAX_DELAY_S),
        (float("-inf"), 0.0),
        (1e300, MAX_DELAY_S),
        (10**400, MAX_DELAY_S),
        ("7", 7.0),
        ("soon", None),
        (True, None),
        (None, None),
        (object(), None),
    ],
)
def test_retry_delay_is_clamped(delay: object, expected: float | None) -> None:
    info = classify.error_info(Retry("later", delay_s=delay))  # type: ignore[arg-type]
    assert info.retry_after_s == expected
    assert info.failure == F.ERROR and info.retryable


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.none(), st.text()))
def test_any_retry_delay_makes_a_valid_error(delay: object) -> None:
    info = classify.error_info(Retry("x", delay_s=delay))  # type: ignore[arg-type]
    assert info.retry_after_s is None or 0 <= info.retry_after_s <= MAX_DELAY_S
    assert info.retry_after_s is None or math.isfinite(info.retry_after_s)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_broken_str_and_empty_messages_still_make_a_report() -> None:
    assert classify.error_info(Unprintable()).message == "Unprintable"
    assert classify.error_info(ValueError()).message == "ValueError"
    long = classify.error_info(ValueError("x" * 10_000))
    assert len(long.message) == classify.MAX_MESSAGE


def test_stop_reasons() -> None:
    lost = classify.lost("lease not renewed")
    assert (lost.failure, lost.type, lost.message) == (F.LOST, "LeaseLost", "lease not renewed")
    pre = classify.preempted(30)
    assert pre.failure == F.PREEMPTED and "30s grace" in pre.message
    assert classify.timeout(2.5).failure == F.TIMEOUT
    inv = classify.invalid("InvalidTask", "undecodable")
    assert inv.failure == F.INVALID and not inv.retryable
    assert classify.infra("ResultNotStored", "x").failure == F.INFRA
