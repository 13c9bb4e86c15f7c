"""Running one task's work: Python handlers (``module:function``) and commands (argv).

Handlers are found by import path, plugin style: no registry file. ``async def`` handlers run on
the worker's event loop; plain functions run in a thread (default) or, with ``executor="process"``,
in a process pool. A task with ``items`` (a bundle) calls the handler once per item and returns
the list of outputs.

Commands run as a subprocess in their own process group (so a timeout or cancel kills the whole
tree), with stdout and stderr captured; a non-zero exit code is a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from broker.server import die_with_parent
from fleet.worker.context import TaskContext
from fleet.worker.errors import CommandFailed, HandlerNotFound

OUTPUT_LIMIT = 64 * 1024
"""Bytes of stdout / stderr kept from each command run."""


@functools.lru_cache(maxsize=512)
def resolve(path: str) -> Callable[..., Any]:
    """Import ``package.module:function``; raise :class:`HandlerNotFound` naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerNotFound(f"cannot import module {module_name!r} for handler {path!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise HandlerNotFound(f"module {module_name!r} has no attribute {attr!r} (handler {path!r})")
    if not callable(obj):
        raise HandlerNotFound(f"handler {path!r} is not callable")
    return obj  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=512)
def _wants_ctx(fn: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Executor:
    """Runs handlers and commands for one worker."""

    def __init__(self, *, mode: str = "thread", concurrency: int = 4) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', not {mode!r}")
        self.mode = mode
        self.pool: concurrent.futures.Executor = (
            concurrent.futures.ProcessPoolExecutor(max_workers=concurrency)
            if mode == "process"
            else concurrent.futures.ThreadPoolExecutor(
                max_workers=concurrency, thread_name_prefix="fleet-task"
            )
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run_handler(self, path: str, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        fn = resolve(path)
        args = list(inputs.get("args") or [])
        kwargs = dict(inputs.get("kwargs") or {})
        items = inputs.get("items")
        if items is None:
            return await self._call(fn, path, args, kwargs, ctx)
        outputs = []
        for i, item in enumerate(items):
            outputs.append(await self._call(fn, path, [item, *args], kwargs, ctx))
            ctx.progress((i + 1) / len(items), f"{i + 1}/{len(items)} items")
        return outputs

    async def _call(
        self, fn: Callable[..., Any], path: str, args: list[Any], kwargs: dict[str, Any], ctx: TaskContext
    ) -> Any:
        if inspect.iscoroutinefunction(fn):
            if _wants_ctx(fn):
                kwargs = {**kwargs, "ctx": ctx}
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        if self.mode == "process":
            # contexts do not cross process boundaries; handlers get ctx=None there
            if _wants_ctx(fn):
                kwargs = {**kwargs, "ctx": None}
            return await loop.run_in_executor(self.pool, functools.partial(_call_by_path, path, args, kwargs))
        if _wants_ctx(fn):
            kwargs = {**kwargs, "ctx": ctx}
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def run_command(self, argv: list[str], inputs: dict[str, Any], ctx: TaskContext) -> Any:
        items = inputs.get("items")
        if items is None:
            return await _run_argv(argv, None, ctx)
        outputs = []
        for i, item in enumerate(items):
            outputs.append(await _run_argv(argv, item, ctx))
            ctx.progress((i + 1) / len(items), f"{i + 1}/{len(items)} items")
        return outputs


def _call_by_path(path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return resolve(path)(*args, **kwargs)


def _item_text(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))


async def _run_argv(argv: list[str], item: Any, ctx: TaskContext) -> dict[str, Any]:
    text = _item_text(item) if item is not None else ""
    cmd = [a.replace("{item}", text) for a in argv]
    env = dict(
        os.environ,
        FLEET_TASK_ID=ctx.task_id,
        FLEET_JOB_ID=ctx.job_id,
        FLEET_ATTEMPT=str(ctx.attempt),
        FLEET_ITEM=text,
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # own process group: killpg reaches every child
            preexec_fn=die_with_parent,  # and it dies if the worker is killed
        )
    except OSError as exc:
        raise CommandFailed(f"cannot start {cmd[0]!r}: {exc.strerror or exc}", exit_code=127) from None
    try:
        out, err = await proc.communicate()
    except BaseException:  # cancelled or timed out: take the whole group down
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    stdout = out[-OUTPUT_LIMIT:].decode(errors="replace")
    stderr = err[-OUTPUT_LIMIT:].decode(errors="replace")
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise CommandFailed(
            f"command {cmd[0]!r} exited with code {proc.returncode}: {tail[0]}", proc.returncode or 1
        )
    return {"exit_code": 0, "stdout": stdout, "stderr": stderr}
