"""Exceptions handlers raise to say *how* they failed, and the ones the worker raises for them.

    FleetTaskError
     +-- Retry            transient: try again (optionally after ``delay_s``)
     +-- Permanent        this input will never succeed: no retry
     |    +-- InvalidTask       the task can never run here (failure class ``invalid``)
     |         +-- HandlerNotFound    the ``module:function`` cannot be imported
     |         +-- HandlerNotAllowed  the handler's module is not on the worker's allow-list
     |         +-- InvalidInput       the inputs are not a map of args / kwargs / items
     +-- CommandFailed    a command exited non-zero (or was killed by a signal)
     +-- TaskTimeout      the attempt ran past ``timeout_s``
     +-- HandlerCrashed   the process running the handler died (a process-pool child)

Any other exception counts as transient and is retried by the task's retry policy.
:mod:`fleet.worker.classify` maps each of them to a failure class.
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


class InvalidTask(Permanent):
    """The task can never run: bad handler name, refused handler, malformed inputs."""


class HandlerNotFound(InvalidTask):
    """The ``module:function`` named by a task cannot be imported."""


class HandlerNotAllowed(InvalidTask):
    """The handler's module is not on this worker's allow-list (``fleet worker --allow``)."""


class InvalidInput(InvalidTask):
    """The task's inputs are not a map with ``args`` (list), ``kwargs`` (map) and ``items`` (list)."""


class CommandFailed(FleetTaskError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        """The exit status; negative when the command was killed by that signal (``-9``: SIGKILL)."""

    @property
    def killed(self) -> bool:
        return self.exit_code < 0


class TaskTimeout(FleetTaskError):
    """The attempt ran past the task's ``timeout_s``."""


class HandlerCrashed(FleetTaskError):
    """The process running the handler died (killed, out of memory, or it called ``os._exit``)."""
