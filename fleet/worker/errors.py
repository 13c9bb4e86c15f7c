"""Exceptions handlers raise to say *how* they failed.

    FleetTaskError
     +-- Retry          transient: try again (optionally after ``delay_s``)
     +-- Permanent      this input will never succeed: no retry

Any other exception counts as transient and is retried by the task's retry policy; a handler that
cannot be imported fails permanently.
"""

from __future__ import annotations


class FleetTaskError(Exception):
    retryable = True


class Retry(FleetTaskError):
    def __init__(self, message: str = "retry requested", delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Permanent(FleetTaskError):
    retryable = False


class HandlerNotFound(Permanent):
    """The ``module:function`` named by a task cannot be imported."""


class CommandFailed(FleetTaskError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TaskTimeout(FleetTaskError):
    """The attempt ran past the task's ``timeout_s``."""
