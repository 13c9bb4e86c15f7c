"""Handler resolution and task execution, without NATS.

The handlers used here live in this module; pytest's default ``prepend`` import mode puts
``tests/unit`` on ``sys.path`` (there is no ``__init__.py``), so they resolve as ``"<module>:<name>"``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.worker.allow import AllowList
from fleet.worker.context import TaskContext, TaskInfo
from fleet.worker.errors import (
    CommandFailed,
    FleetTaskError,
    HandlerCrashed,
    HandlerNotAllowed,
    HandlerNotFound,
    InvalidInput,
    InvalidTask,
    Permanent,
)
from fleet.worker.execute import OUTPUT_LIMIT, Executor, check_inputs, resolve

MOD = __name__


def h(name: str) -> str:
    return f"{MOD}:{name}"


# ---- handlers ------------------------------------------------------------------------------------------------
NOT_CALLABLE = 42
NOTHING = None


def add(a: int, b: int = 0) -> int:
    return a + b


def whoami() -> str:
    return threading.current_thread().name


def with_ctx(x: int, ctx: TaskContext) -> dict[str, Any]:
    ctx.progress(0.5, "half")
    ctx.log.info("saw %s", x)
    return {"x": x, "task": ctx.task_id, "attempt": ctx.attempt, "thread": threading.current_thread().name}


def square_plus(item: int, offset: int = 0, *, scale: int = 1) -> int:
    return item * item * scale + offset


def ctx_or_none(ctx: Any = "missing") -> Any:
    return None if ctx is None else "got-ctx"


def in_process() -> int:
    return os.getpid()


def boom() -> None:
    raise ValueError("handler failed")


def die() -> None:
    os._exit(3)  # a process-pool child that dies


GATE = threading.Event()


def wait_gate() -> str:
    """Ignores cancellation: returns only when GATE is set."""
    GATE.wait(10)
    return "through"


def my_token(ctx: TaskContext) -> tuple[int, bool]:
    return ctx.token, ctx.fenced


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def async_with_ctx(item: str, ctx: TaskContext) -> str:
    ctx.progress(1.0)
    return f"{item}@{ctx.job_id}:{threading.current_thread().name}"


class Namespace:
    @staticmethod
    def triple(x: int) -> int:
        return 3 * x

    class Inner:
        @staticmethod
        def neg(x: int) -> int:
            return -x


# ---- fixtures ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.progress: list[tuple[float, str | None]] = []
        self.logs: list[tuple[str, str]] = []


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(rec: Recorder) -> Iterator[TaskContext]:
    info = TaskInfo(
        task_id="t-1", job_id="j-1", attempt=2, delivery=1, worker_id="w1", queue="default", token=7001
    )
    c = TaskContext(
        info, lambda f, m: rec.progress.append((f, m)), lambda lvl, msg: rec.logs.append((lvl, msg))
    )
    yield c
    c.close()


@pytest.fixture
async def ex() -> AsyncIterator[Executor]:
    e = Executor(concurrency=2)
    yield e
    e.close()


# ---- resolve ------------------------------------------------------------------------------------------------
def test_handlers_module_is_importable_by_name() -> None:
    assert sys.modules[MOD].add is add
    assert resolve(h("add")) is add


def test_resolve_nested_attributes() -> None:
    assert resolve(h("Namespace.triple"))(2) == 6
    assert resolve(h("Namespace.Inner.neg"))(2) == -2
    assert resolve("os.path:join") is os.path.join


def test_resolve_missing_module() -> None:
    with pytest.raises(HandlerNotFound) as info:
        resolve("no_such_module_xyz.sub:func")
    msg = str(info.value)
    assert "cannot import module 'no_such_module_xyz.sub'" in msg
    assert "'no_such_module_xyz.sub:func'" in msg


@pytest.mark.parametrize("attr", ["missing", "Namespace.missing", "Namespace.Inner.gone", "NOTHING"])
def test_resolve_missing_attribute(attr: str) -> None:
    with pytest.raises(HandlerNotFound) as info:
        resolve(h(attr))
    assert f"module {MOD!r} has no attribute {attr!r}" in str(info.value)


def test_resolve_not_callable() -> None:
    with pytest.raises(HandlerNotFound, match=r"handler '.*:NOT_CALLABLE' is not callable"):
        resolve(h("NOT_CALLABLE"))


def test_handler_not_found_is_permanent() -> None:
    assert issubclass(HandlerNotFound, InvalidTask) and issubclass(InvalidTask, Permanent)
    assert HandlerNotFound.retryable is False
    assert CommandFailed("x", 1).retryable is True


def test_executor_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="executor must be 'thread' or 'process'"):
        Executor(mode="fiber")


# ---- handlers -------------------------------------------------------------------------------------------
async def test_sync_handler_runs_in_a_worker_thread(ex: Executor, ctx: TaskContext) -> None:
    assert await ex.run_handler(h("add"), {"args": [2], "kwargs": {"b": 3}}, ctx) == 5
    assert await ex.run_handler(h("add"), {"args": [7]}, ctx) == 7
    name = await ex.run_handler(h("whoami"), {}, ctx)
    assert name.startswith("fleet-task")


async def test_async_handler_runs_on_the_loop(ex: Executor, ctx: TaskContext, rec: Recorder) -> None:
    assert await ex.run_handler(h("async_add"), {"args": [1, 2]}, ctx) == 3
    out = await ex.run_handler(h("async_with_ctx"), {"args": ["a"]}, ctx)
    assert out == f"a@j-1:{threading.current_thread().name}"
    assert rec.progress == [(1.0, None)]


async def test_ctx_injected_when_declared(ex: Executor, ctx: TaskContext, rec: Recorder) -> None:
    out = await ex.run_handler(h("with_ctx"), {"args": [9]}, ctx)
    assert out["x"] == 9
    assert (out["task"], out["attempt"]) == ("t-1", 2)
    assert out["thread"].startswith("fleet-task")
    assert rec.progress == [(0.5, "half")]
    assert rec.logs == [("info", "saw 9")]


async def test_ctx_not_passed_when_not_declared(ex: Executor, ctx: TaskContext) -> None:
    # add() would fail with an unexpected keyword argument if ctx were passed
    assert await ex.run_handler(h("add"), {"args": [1, 1]}, ctx) == 2


async def test_bundle_calls_once_per_item(ex: Executor, ctx: TaskContext, rec: Recorder) -> None:
    inputs = {"items": [1, 2, 3, 4], "args": [10], "kwargs": {"scale": 2}}
    assert await ex.run_handler(h("square_plus"), inputs, ctx) == [12, 18, 28, 42]
    assert rec.progress == [(0.25, "1/4 items"), (0.5, "2/4 items"), (0.75, "3/4 items"), (1.0, "4/4 items")]


async def test_async_bundle(ex: Executor, ctx: TaskContext) -> None:
    assert await ex.run_handler(h("async_with_ctx"), {"items": ["x", "y"]}, ctx) == [
        f"x@j-1:{threading.current_thread().name}",
        f"y@j-1:{threading.current_thread().name}",
    ]


async def test_empty_bundle(ex: Executor, ctx: TaskContext, rec: Recorder) -> None:
    assert await ex.run_handler(h("square_plus"), {"items": []}, ctx) == []
    assert rec.progress == []


async def test_handler_exception_propagates(ex: Executor, ctx: TaskContext) -> None:
    with pytest.raises(ValueError, match="handler failed"):
        await ex.run_handler(h("boom"), {}, ctx)


async def test_unknown_handler_raises_not_found(ex: Executor, ctx: TaskContext) -> None:
    with pytest.raises(HandlerNotFound):
        await ex.run_handler(h("does_not_exist"), {}, ctx)


async def test_process_mode_runs_elsewhere_without_ctx(ctx: TaskContext) -> None:
    e = Executor(mode="process", concurrency=1)
    try:
        assert await e.run_handler(h("in_process"), {}, ctx) != os.getpid()
        assert await e.run_handler(h("ctx_or_none"), {}, ctx) is None
        assert await e.run_handler(h("square_plus"), {"items": [2, 3]}, ctx) == [4, 9]
    finally:
        e.pool.shutdown(wait=True)


# ---- commands --------------------------------------------------------------------------------------------
async def test_command_success_captures_output(ex: Executor, ctx: TaskContext) -> None:
    out = await ex.run_command(["sh", "-c", "echo hello; echo warn >&2"], {}, ctx)
    assert out == {"exit_code": 0, "stdout": "hello\n", "stderr": "warn\n"}


async def test_command_failure_reports_code_and_stderr_tail(ex: Executor, ctx: TaskContext) -> None:
    script = "echo out; echo first >&2; echo 'the last words' >&2; exit 3"
    with pytest.raises(CommandFailed) as info:
        await ex.run_command(["sh", "-c", script], {}, ctx)
    assert info.value.exit_code == 3
    msg = str(info.value)
    assert msg == "command 'sh' exited with code 3: the last words"
    assert isinstance(info.value, FleetTaskError)


async def test_command_failure_without_stderr(ex: Executor, ctx: TaskContext) -> None:
    with pytest.raises(CommandFailed, match=r"exited with code 1: \(no stderr\)") as info:
        await ex.run_command(["false"], {}, ctx)
    assert info.value.exit_code == 1


async def test_command_not_found(ex: Executor, ctx: TaskContext) -> None:
    with pytest.raises(CommandFailed, match="cannot start 'no-such-binary-xyz'") as info:
        await ex.run_command(["no-such-binary-xyz", "arg"], {}, ctx)
    assert info.value.exit_code == 127


async def test_command_item_substitution(ex: Executor, ctx: TaskContext, rec: Recorder) -> None:
    items = ["plain", {"k": [1, 2]}, 5, "has space"]
    outs = await ex.run_command(["printf", "%s|", "<{item}>", "{item}{item}"], {"items": items}, ctx)
    assert [o["stdout"] for o in outs] == [
        "<plain>|plainplain|",
        '<{"k":[1,2]}>|{"k":[1,2]}{"k":[1,2]}|',
        "<5>|55|",
        "<has space>|has spacehas space|",
    ]
    assert [p[1] for p in rec.progress] == ["1/4 items", "2/4 items", "3/4 items", "4/4 items"]


async def test_command_without_items_leaves_placeholder_empty(ex: Executor, ctx: TaskContext) -> None:
    out = await ex.run_command(["printf", "[%s]", "{item}"], {}, ctx)
    assert out["stdout"] == "[]"


async def test_command_environment(ex: Executor, ctx: TaskContext) -> None:
    script = 'printf "%s %s %s %s %s" "$FLEET_TASK_ID" "$FLEET_JOB_ID" "$FLEET_ATTEMPT" "$FLEET_TOKEN" "$FLEET_ITEM"'
    (out,) = await ex.run_command(["sh", "-c", script], {"items": [{"a": 1}]}, ctx)
    assert out["stdout"] == 't-1 j-1 2 7001 {"a":1}'


async def test_command_output_is_truncated(ex: Executor, ctx: TaskContext) -> None:
    n = OUTPUT_LIMIT + 1000
    out = await ex.run_command(["sh", "-c", f"head -c {n} /dev/zero | tr '\\0' a; printf b"], {}, ctx)
    assert len(out["stdout"]) == OUTPUT_LIMIT
    assert out["stdout"].endswith("ab")


async def test_bundle_stops_at_first_failing_item(ex: Executor, ctx: TaskContext, tmp_path: Path) -> None:
    log = tmp_path / "ran"
    argv = ["sh", "-c", f'echo "$FLEET_ITEM" >> {log}; test "$FLEET_ITEM" != 2']
    with pytest.raises(CommandFailed):
        await ex.run_command(argv, {"items": [1, 2, 3]}, ctx)
    assert log.read_text().split() == ["1", "2"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie no one has reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


async def test_cancel_kills_the_whole_process_group(ex: Executor, ctx: TaskContext, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # the shell starts a grandchild (sleep) and waits for it: only a group kill reaches both
    argv = ["sh", "-c", f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"]
    task = asyncio.create_task(ex.run_command(argv, {}, ctx))
    deadline = time.monotonic() + 5
    while not pidfile.exists():
        assert time.monotonic() < deadline, "command did not start"
        assert not task.done()
        await asyncio.sleep(0.01)
    child = int(pidfile.read_text())
    assert not _gone(child)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(task, timeout=0.1)
    assert task.cancelled()
    assert time.monotonic() - started < 2.0
    deadline = time.monotonic() + 2
    while not _gone(child):
        assert time.monotonic() < deadline, f"grandchild {child} survived the cancel"
        await asyncio.sleep(0.01)


async def test_command_killed_by_a_signal_says_so(ex: Executor, ctx: TaskContext) -> None:
    with pytest.raises(CommandFailed, match="was killed by SIGKILL") as info:
        await ex.run_command(["sh", "-c", "kill -9 $$"], {}, ctx)
    assert info.value.exit_code == -9 and info.value.killed
    assert not CommandFailed("x", 3).killed


# ---- allow-list, inputs, context ------------------------------------------------------------------------
async def test_refused_handler_is_not_even_imported(ctx: TaskContext) -> None:
    assert "this" not in sys.modules
    e = Executor(concurrency=1)
    try:
        with pytest.raises(HandlerNotAllowed, match="'this:x' is not allowed"):
            await e.run_handler("this:x", {}, ctx)  # importing 'this' prints the Zen of Python
        with pytest.raises(HandlerNotAllowed):
            await e.run_handler("os:getcwd", {}, ctx)
    finally:
        e.close()
    assert "this" not in sys.modules


async def test_allow_prefixes(ctx: TaskContext) -> None:
    e = Executor(concurrency=1, allow=AllowList(["tests_nothing"]))
    try:
        with pytest.raises(HandlerNotAllowed, match="only runs handlers under 'tests_nothing'"):
            await e.run_handler(h("add"), {"args": [1]}, ctx)
    finally:
        e.close()
    e = Executor(concurrency=1, allow=AllowList([MOD]))
    try:
        assert await e.run_handler(h("add"), {"args": [1, 2]}, ctx) == 3
    finally:
        e.close()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([1, 2], "must be a map"),
        ("x", "must be a map"),
        ({"args": 5}, "args must be a list"),
        ({"kwargs": [1]}, "kwargs must be a map"),
        ({"kwargs": {1: 2}}, "kwargs must be a map"),
        ({"items": {"a": 1}}, "items must be a list"),
    ],
)
def test_malformed_inputs_are_invalid(inputs: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_inputs(inputs)


def test_wellformed_inputs_pass() -> None:
    inputs = {"args": [1], "kwargs": {"a": 1}, "items": [], "extra": None}
    assert check_inputs(inputs) is inputs
    assert check_inputs({}) == {}


async def test_ctx_token_and_fenced(ex: Executor, ctx: TaskContext) -> None:
    assert await ex.run_handler(h("my_token"), {}, ctx) == (7001, False)
    ctx.fence()
    assert ctx.fenced and ctx.cancelled
    assert await ex.run_handler(h("my_token"), {}, ctx) == (7001, True)


# ---- abandoned threads, crashed pool children -------------------------------------------------------------
async def test_cancelled_thread_call_lingers_until_it_returns(ctx: TaskContext) -> None:
    lingering: list[Any] = []
    e = Executor(concurrency=1, on_linger=lingering.append)
    GATE.clear()
    try:
        task = asyncio.create_task(e.run_handler(h("wait_gate"), {}, ctx))
        deadline = time.monotonic() + 5
        while e.busy == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(lingering) == 1 and not lingering[0].done()
        assert e.busy == 1, "the thread still runs"
        GATE.set()
        deadline = time.monotonic() + 5
        while e.busy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert lingering[0].result() == "through"
    finally:
        GATE.set()
        e.close()


async def test_dead_pool_child_fails_the_call_and_the_pool_is_replaced(ctx: TaskContext) -> None:
    e = Executor(mode="process", concurrency=1)
    try:
        with pytest.raises(HandlerCrashed, match="died"):
            await e.run_handler(h("die"), {}, ctx)
        assert e.pools_replaced == 1
        assert await e.run_handler(h("add"), {"args": [2, 3]}, ctx) == 5
    finally:
        e.close(kill=True)
