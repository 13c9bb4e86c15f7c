"""Failure classification: what kind of failure ended a delivery (:mod:`fleet.core.failures`).

Every failed DoneReport carries an :class:`ErrorInfo` whose ``failure`` picks the retry budget the
scheduler charges. Where an exception came from matters as much as its type, so callers say which
phase failed:

======== ============================================================== ==========
phase    exception                                                      class
======== ============================================================== ==========
input    undecodable payload (``DecodeError``), inputs not a map         invalid
input    ``BlobMissing``, NATS errors, anything else loading the inputs  infra
run      ``HandlerNotFound``, ``HandlerNotAllowed``, ``InvalidInput``    invalid
run      ``TaskTimeout`` (the attempt's ``timeout_s`` expired)           timeout
run      ``CommandFailed`` with a negative code (killed by a signal)     killed
run      ``HandlerCrashed`` / ``BrokenProcessPool`` (pool child died)    killed
run      ``Permanent`` (not retryable), ``Retry`` (with a delay), other  error
result   the result cannot be encoded (``TypeError``)                   error, not retryable
result   storing an offloaded result failed                             infra
======== ============================================================== ==========

``lost`` (self-fenced) and ``preempted`` (drained at shutdown) are not exceptions: see
:func:`lost` and :func:`preempted`. Building an ErrorInfo never raises, whatever the exception
holds (a broken ``__str__``, a ``Retry(delay_s=nan)``).
"""

from __future__ import annotations

import math
import traceback
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

from broker.codec import DecodeError
from fleet.core.failures import FailureClass
from fleet.core.records import MAX_DELAY_S, ErrorInfo
from fleet.worker.errors import CommandFailed, FleetTaskError, HandlerCrashed, InvalidTask, Retry, TaskTimeout

Phase = Literal["input", "run", "result"]

MAX_MESSAGE = 2000
MAX_TRACEBACK = 8000


def failure_class(exc: BaseException, phase: Phase = "run") -> FailureClass:
    if phase == "input":
        return FailureClass.INVALID if isinstance(exc, DecodeError | InvalidTask) else FailureClass.INFRA
    if phase == "result":
        return FailureClass.ERROR if isinstance(exc, TypeError) else FailureClass.INFRA
    if isinstance(exc, InvalidTask):
        return FailureClass.INVALID
    if isinstance(exc, TaskTimeout):
        return FailureClass.TIMEOUT
    if isinstance(exc, HandlerCrashed | BrokenProcessPool):
        return FailureClass.KILLED
    if isinstance(exc, CommandFailed) and exc.killed:
        return FailureClass.KILLED
    return FailureClass.ERROR


def error_info(exc: BaseException, phase: Phase = "run") -> ErrorInfo:
    """The ErrorInfo of a delivery that ended with ``exc`` in ``phase``."""
    cls = failure_class(exc, phase)
    if cls == FailureClass.INVALID or (phase == "result" and cls == FailureClass.ERROR):
        retryable = False
    elif isinstance(exc, FleetTaskError):
        retryable = bool(getattr(exc, "retryable", True))
    else:
        retryable = True
    kind = type(exc).__name__
    if phase == "result" and cls == FailureClass.ERROR:
        kind = "ResultNotSerializable"
    elif phase == "result":
        kind = "ResultNotStored"
    return _info(
        kind=kind,
        message=_text(exc),
        tb=_traceback(exc),
        retryable=retryable,
        failure=cls,
        delay=_delay(exc.delay_s) if isinstance(exc, Retry) else None,
    )


def timeout(timeout_s: float | None) -> ErrorInfo:
    return _info(
        kind="TaskTimeout",
        message=f"attempt exceeded its timeout of {timeout_s}s",
        failure=FailureClass.TIMEOUT,
    )


def preempted(grace_s: float) -> ErrorInfo:
    return _info(
        kind="Preempted",
        message=f"the worker shut down and the task did not finish within the {grace_s:g}s grace period",
        failure=FailureClass.PREEMPTED,
    )


def lost(reason: str) -> ErrorInfo:
    return _info(kind="LeaseLost", message=reason, failure=FailureClass.LOST)


def invalid(kind: str, message: str) -> ErrorInfo:
    return _info(kind=kind, message=message, failure=FailureClass.INVALID, retryable=False)


def infra(kind: str, message: str) -> ErrorInfo:
    return _info(kind=kind, message=message, failure=FailureClass.INFRA)


def _info(
    *,
    kind: str,
    message: str,
    failure: FailureClass,
    tb: str | None = None,
    retryable: bool = True,
    delay: float | None = None,
) -> ErrorInfo:
    return ErrorInfo(
        type=kind[:500] or "Error",
        message=message[:MAX_MESSAGE] or kind[:500] or "Error",
        traceback=tb,
        retryable=retryable,
        failure=failure,
        retry_after_s=delay,
    )


def _delay(value: object) -> float | None:
    """A handler's requested delay, cut to 0 .. MAX_DELAY_S; None when it is not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) and value > MAX_DELAY_S:
        return MAX_DELAY_S
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(f) or f < 0:
        return 0.0
    return min(f, MAX_DELAY_S)


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break the report
        text = ""
    return text or type(exc).__name__


def _traceback(exc: BaseException) -> str | None:
    try:
        return "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    except Exception:
        return None
