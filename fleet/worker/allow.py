"""Which handler modules a worker agrees to import and run (``fleet worker --allow PREFIX``).

A handler is named ``package.module:function`` by whoever submitted the task, and importing a
module runs its code, so the check happens before the import. With prefixes, only modules equal to
a prefix or below it (``PREFIX.``) are allowed. Without, anything is allowed except the standard
library and built-in modules: ``os:system`` or ``subprocess:run`` would turn a task into a shell.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from fleet.worker.errors import HandlerNotAllowed

_REFUSED = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {"builtins"}


class AllowList:
    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self.prefixes = tuple(p.strip().rstrip(".") for p in prefixes if p.strip().rstrip("."))

    def allows(self, handler: str) -> bool:
        module = handler.partition(":")[0]
        if self.prefixes:
            return any(module == p or module.startswith(p + ".") for p in self.prefixes)
        top = module.split(".", 1)[0]
        return bool(top) and top not in _REFUSED

    def check(self, handler: str) -> None:
        """Raise :class:`HandlerNotAllowed` (a permanent, ``invalid`` failure) naming the rule."""
        if self.allows(handler):
            return
        module = handler.partition(":")[0]
        if self.prefixes:
            rule = "this worker only runs handlers under " + ", ".join(repr(p) for p in self.prefixes)
        else:
            rule = (
                "the allow-list refuses standard-library and built-in modules by default "
                "(start the worker with --allow PREFIX to choose what runs)"
            )
        raise HandlerNotAllowed(f"handler {handler!r} is not allowed: module {module!r} refused; {rule}")

    def describe(self) -> str:
        return ", ".join(self.prefixes) if self.prefixes else "anything but the standard library"
