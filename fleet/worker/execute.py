"""Running one task's work: Python handlers (``module:function``) and commands (argv).

Handlers are found by import path, plugin style: no registry file, but an allow-list
(:mod:`fleet.worker.allow`) is checked before anything is imported. ``async def`` handlers run on
the worker's event loop; plain functions run in a thread (default) or, with ``executor="process"``,
in a process pool. A task with ``items`` (a bundle) calls the handler once per item and returns
the list of outputs.

A cancelled thread (or pool) call cannot be stopped: its outcome is discarded and ``on_linger`` is
told, so the worker can count the busy thread until it returns. The process pool is started with
``forkserver`` (children do not inherit the worker's threads, signal handlers or signal wakeup fd)
and its children ignore SIGINT. A pool child that dies (``BrokenProcessPool``) fails its task as
:class:`HandlerCrashed` and the pool is replaced, so the worker keeps serving.

Commands run as a subprocess in their own process group (so a timeout or cancel kills the whole
tree), with stdout and stderr captured; a non-zero exit code is a failure, a negative one (killed
by a signal) says which signal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from broker.server import die_with_parent
from fleet.worker.allow import AllowList
from fleet.worker.context import TaskContext
from fleet.worker.errors import CommandFailed, HandlerCrashed, HandlerNotFound, InvalidInput

OUTPUT_LIMIT = 64 * 1024
"""Bytes of stdout / stderr kept from each command run."""

Linger = Callable[["concurrent.futures.Future[Any]"], None]


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


def check_inputs(inputs: Any) -> dict[str, Any]:
    """The decoded payload of a task: a map with optional ``args``, ``kwargs`` and ``items``."""
    if not isinstance(inputs, dict):
        raise InvalidInput(f"task inputs must be a map with args/kwargs/items, got {type(inputs).__name__}")
    if inputs.get("args") is not None and not isinstance(inputs["args"], list):
        raise InvalidInput(f"task inputs: args must be a list, got {type(inputs['args']).__name__}")
    kwargs = inputs.get("kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        raise InvalidInput("task inputs: kwargs must be a map with string keys")
    if inputs.get("items") is not None and not isinstance(inputs["items"], list):
        raise InvalidInput(f"task inputs: items must be a list, got {type(inputs['items']).__name__}")
    return inputs


@functools.lru_cache(maxsize=512)
def _wants_ctx(fn: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _child_init() -> None:
    """Process-pool children: Ctrl-C is for the worker (it drains them); SIGTERM kills them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    die_with_parent()


def _pool_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class Executor:
    """Runs handlers and commands for one worker."""

    def __init__(
        self,
        *,
        mode: str = "thread",
        concurrency: int = 4,
        allow: AllowList | None = None,
        on_linger: Linger | None = None,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', not {mode!r}")
        self.mode = mode
        self.concurrency = concurrency
        self.allow = allow or AllowList()
        self.on_linger = on_linger
        self.pools_replaced = 0
        self._busy: set[concurrent.futures.Future[Any]] = set()
        self._busy_lock = threading.Lock()
        self.pool: concurrent.futures.Executor = self._new_pool()

    def _new_pool(self) -> concurrent.futures.Executor:
        if self.mode == "process":
            return concurrent.futures.ProcessPoolExecutor(
                max_workers=self.concurrency, mp_context=_pool_context(), initializer=_child_init
            )
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="fleet-task"
        )

    @property
    def busy(self) -> int:
        """Calls submitted to the pool that have not returned (including abandoned ones)."""
        with self._busy_lock:
            return len(self._busy)

    def close(self, *, kill: bool = False) -> None:
        """Shut the pool down without waiting; ``kill`` also kills process-pool children."""
        pool = self.pool
        children = list((getattr(pool, "_processes", None) or {}).values()) if kill else []
        pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            with contextlib.suppress(Exception):
                child.kill()

    async def run_handler(self, path: str, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        self.allow.check(path)
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
        if self.mode == "process":
            # contexts do not cross process boundaries; handlers get ctx=None there
            if _wants_ctx(fn):
                kwargs = {**kwargs, "ctx": None}
            return await self._submit(functools.partial(_call_by_path, path, args, kwargs), path)
        if _wants_ctx(fn):
            kwargs = {**kwargs, "ctx": ctx}
        return await self._submit(functools.partial(fn, *args, **kwargs), path)

    async def _submit(self, call: Callable[[], Any], path: str) -> Any:
        pool = self.pool
        try:
            cfut = pool.submit(call)
        except BrokenProcessPool as exc:
            self._replace(pool)
            raise HandlerCrashed(f"the process pool for handler {path!r} was broken: {exc}") from None
        with self._busy_lock:
            self._busy.add(cfut)
        cfut.add_done_callback(self._not_busy)
        try:
            return await asyncio.wrap_future(cfut)
        except BrokenProcessPool as exc:
            self._replace(pool)
            raise HandlerCrashed(
                f"the process running handler {path!r} died (killed, out of memory, or it exited): {exc}"
            ) from None
        except asyncio.CancelledError:
            if not cfut.done() and self.on_linger is not None:
                self.on_linger(cfut)  # it runs on: its outcome is discarded
            raise

    def _not_busy(self, cfut: concurrent.futures.Future[Any]) -> None:
        with self._busy_lock:
            self._busy.discard(cfut)

    def _replace(self, broken: concurrent.futures.Executor) -> None:
        if self.pool is not broken:
            return  # another task already replaced it
        self.pool = self._new_pool()
        self.pools_replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)

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


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


async def _run_argv(argv: list[str], item: Any, ctx: TaskContext) -> dict[str, Any]:
    text = _item_text(item) if item is not None else ""
    cmd = [a.replace("{item}", text) for a in argv]
    env = dict(
        os.environ,
        FLEET_TASK_ID=ctx.task_id,
        FLEET_JOB_ID=ctx.job_id,
        FLEET_ATTEMPT=str(ctx.attempt),
        FLEET_TOKEN=str(ctx.token),
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
    except BaseException:  # cancelled, timed out or fenced: take the whole group down
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    stdout = out[-OUTPUT_LIMIT:].decode(errors="replace")
    stderr = err[-OUTPUT_LIMIT:].decode(errors="replace")
    code = proc.returncode
    if code is not None and code < 0:
        raise CommandFailed(f"command {cmd[0]!r} was killed by {_signal_name(-code)}", code)
    if code != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise CommandFailed(f"command {cmd[0]!r} exited with code {code}: {tail[0]}", code or 1)
    return {"exit_code": 0, "stdout": stdout, "stderr": stderr}
