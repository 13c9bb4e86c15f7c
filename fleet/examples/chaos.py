"""Handlers for the fault rounds (``fleet chaos``, ``tests/fault``), named ``fleet.examples.chaos:<fn>``.

:func:`fenced_commit` does some work, then commits a side effect to a file-based store that every
worker process on this machine shares, *fenced by* ``ctx.token``: the store remembers, per task, the
highest token that has begun, and refuses the commit of any delivery that a newer one has overtaken
(or that the worker knows is fenced, or that the scheduler does not confirm as the task's holder
right before the commit: ``ctx.confirm()``). ``commits.log`` then holds one line ``job task token pid`` per
committed side effect, so a task committed twice is visible there. Reads and writes of the store are
serialised with ``fcntl.flock`` on one lock file (released by the kernel if the process is killed).

:func:`poison` kills its own worker every time; :func:`cpu_block` and :func:`loop_block` hold the
GIL-bound CPU or the worker's event loop for longer than a heartbeat interval.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMITS = "commits.log"
LOCK = "store.lock"
FENCES = "fences"
STEP_S = 0.02


class Fenced(RuntimeError):
    """The commit was refused: a newer delivery of the task has begun, or this one was fenced."""


@contextlib.contextmanager
def locked(store: Path) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    with (store / LOCK).open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fence_path(store: Path, key: str) -> Path:
    return store / FENCES / key


def _read_fence(store: Path, key: str) -> int:
    try:
        return int(_fence_path(store, key).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def begin(store: Path, key: str, token: int) -> int:
    """Raise the task's fence to ``max(stored, token)``; returns the fence now stored."""
    with locked(store):
        fence = max(_read_fence(store, key), token)
        path = _fence_path(store, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(str(fence))
        tmp.replace(path)
        return fence


def commit(store: Path, job: str, task: str, token: int, *, fenced: bool) -> None:
    """Append ``job task token`` to the commit log unless a higher token has begun or ``fenced``."""
    key = f"{job}.{task}"
    with locked(store):
        fence = _read_fence(store, key)
        if fenced or fence > token:
            raise Fenced(f"fenced: {key} token {token} (highest begun {fence}, ctx.fenced={fenced})")
        with (store / COMMITS).open("a") as fh:
            fh.write(f"{job} {task} {token} {os.getpid()}\n")
            fh.flush()


def read_commits(store: str | Path) -> list[tuple[str, str, int, int]]:
    """Every committed side effect as ``(job, task, token, pid)``, in commit order."""
    try:
        lines = (Path(store) / COMMITS).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        job, task, token, pid = line.split()
        out.append((job, task, int(token), int(pid)))
    return out


def highest_begun(store: str | Path, job: str, task: str) -> int:
    """The fence stored for a task (0 if none of its deliveries has begun)."""
    return _read_fence(Path(store), f"{job}.{task}")


def fenced_commit(item: Any, ctx: Any, store: str, seconds: float = 0.2) -> dict[str, Any]:
    """Work for ``seconds`` (in small steps, stopping early once fenced or cancelled), have the scheduler
    confirm this delivery as the task's holder (``ctx.confirm()``), then commit fenced by ``ctx.token``."""
    root = Path(store)
    begin(root, f"{ctx.job_id}.{ctx.task_id}", ctx.token)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (ctx.fenced or ctx.cancelled):
        time.sleep(min(STEP_S, max(0.0, end - time.monotonic())))
    if ctx.cancelled and not ctx.fenced:
        raise Fenced(f"cancelled: {ctx.job_id}.{ctx.task_id} token {ctx.token}")
    holder = ctx.confirm()  # the scheduler confirms one delivery per task, even a duplicated one
    commit(root, ctx.job_id, ctx.task_id, ctx.token, fenced=ctx.fenced or not holder)
    return {"item": item, "token": ctx.token}


def poison(item: Any) -> None:
    """Kill this worker process (SIGKILL), every time it runs."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # not reached: SIGKILL is delivered at once


def cpu_block(item: Any, seconds: float) -> Any:
    """Spin the CPU in pure Python (holding the GIL between switches) for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(10_000):
            n += 1
    return item


async def loop_block(item: Any, seconds: float) -> Any:
    """Block the worker's event loop (no await) for ``seconds``."""
    time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
    return item
