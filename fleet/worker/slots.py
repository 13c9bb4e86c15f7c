"""Free-slot accounting for one worker.

:meth:`Slots.take` counts a slot at once (so the next fetch sees it); the returned :class:`Slot`
gives it back when its ``with`` block ends, on every exit path, or when :meth:`Slot.release` is
called (at most once either way). A thread handler whose task was cancelled keeps running in its
pool thread until it returns: the worker takes a slot for it (see ``Executor.on_linger``) so the
fetch loop never promises work to a thread that is still busy.
"""

from __future__ import annotations

import asyncio


class Slots:
    def __init__(self, n: int) -> None:
        self.total = n
        self.busy = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return max(0, self.total - self.busy)

    def take(self) -> Slot:
        self.busy += 1
        return Slot(self)

    def _give_back(self) -> None:
        self.busy -= 1
        self._changed.set()

    async def wait_free(self) -> None:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()


class Slot:
    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._slots is not None:
            self._slots._give_back()
            self._slots = None
