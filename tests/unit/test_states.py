"""The task state machine table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.core.states import (
    REOPEN,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    TaskState,
    can_move,
    check_move,
)

ALL = list(TaskState)
SOURCES: list[TaskState | None] = [None, *ALL]


def test_state_values() -> None:
    assert {s.value for s in TaskState} == {
        "queued",
        "dispatched",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "dead",
        "cancelled",
    }
    assert str(TaskState.RUNNING) == "running"
    assert TaskState("retrying") is TaskState.RETRYING


def test_table_covers_every_state_and_new() -> None:
    assert set(TRANSITIONS) == {None, *ALL}
    for src, dsts in TRANSITIONS.items():
        assert isinstance(dsts, frozenset), src
        assert dsts <= set(ALL), src
        assert src not in dsts, f"{src} has a self-loop"


def test_terminal_states() -> None:
    assert {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DEAD, TaskState.CANCELLED} == TERMINAL
    for s in TERMINAL:
        assert TRANSITIONS[s] == frozenset(), f"terminal {s} has exits"
    for s in set(ALL) - TERMINAL:
        assert TRANSITIONS[s], f"non-terminal {s} has no exits"


def test_every_live_state_can_be_cancelled() -> None:
    for src in [None, *(set(ALL) - TERMINAL)]:
        assert can_move(src, TaskState.CANCELLED), src


def test_specific_moves() -> None:
    assert TRANSITIONS[None] == {TaskState.QUEUED, TaskState.DEAD, TaskState.CANCELLED}
    assert TRANSITIONS[TaskState.QUEUED] == {
        TaskState.DISPATCHED,
        TaskState.RUNNING,  # the start of a dispatch whose record a crash lost
        TaskState.CANCELLED,
        TaskState.DEAD,
    }
    assert TRANSITIONS[TaskState.DISPATCHED] == {
        TaskState.RUNNING,
        TaskState.QUEUED,  # its worker was lost before it started (placed tasks)
        TaskState.CANCELLED,
        TaskState.DEAD,
    }
    # a due retry an admission policy rejects ends DEAD
    assert TRANSITIONS[TaskState.RETRYING] == {TaskState.QUEUED, TaskState.CANCELLED, TaskState.DEAD}
    assert TRANSITIONS[TaskState.RUNNING] == {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.RETRYING,
        TaskState.QUEUED,
        TaskState.CANCELLED,
        TaskState.DEAD,
    }
    assert not can_move(None, TaskState.RUNNING)
    assert not can_move(TaskState.QUEUED, TaskState.SUCCEEDED)
    assert not can_move(TaskState.RETRYING, TaskState.RUNNING)


def _reachable(src: TaskState | None) -> set[TaskState]:
    seen: set[TaskState] = set()
    todo = list(TRANSITIONS[src])
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(TRANSITIONS[s])
    return seen


def test_every_state_reachable_from_new() -> None:
    assert _reachable(None) == set(ALL)


def test_every_live_state_can_finish() -> None:
    for s in set(ALL) - TERMINAL:
        assert _reachable(s) & TERMINAL, s


@pytest.mark.parametrize("src", SOURCES, ids=lambda s: str(s or "new"))
@pytest.mark.parametrize("dst", ALL, ids=str)
def test_check_move_agrees_with_table(src: TaskState | None, dst: TaskState) -> None:
    if dst in TRANSITIONS[src]:
        assert can_move(src, dst)
        assert check_move(src, dst) is dst
    else:
        assert not can_move(src, dst)
        with pytest.raises(IllegalTransition) as info:
            check_move(src, dst)
        assert str(info.value) == f"task cannot move from {src.value if src else 'new'} to {dst.value}"


def test_illegal_transition_is_value_error() -> None:
    assert issubclass(IllegalTransition, ValueError)
    with pytest.raises(ValueError, match="from succeeded to running"):
        check_move(TaskState.SUCCEEDED, TaskState.RUNNING)
    with pytest.raises(ValueError, match="from new to running"):
        check_move(None, TaskState.RUNNING)


def test_reopen_only_failed_and_dead_to_queued() -> None:
    assert {TaskState.FAILED: {TaskState.QUEUED}, TaskState.DEAD: {TaskState.QUEUED}} == REOPEN
    assert set(REOPEN) <= TERMINAL
    for src in (TaskState.FAILED, TaskState.DEAD):
        assert can_move(src, TaskState.QUEUED, reopen=True)
        assert not can_move(src, TaskState.QUEUED)  # only an operator's retry request reopens
        with pytest.raises(IllegalTransition):
            check_move(src, TaskState.QUEUED)


@pytest.mark.parametrize("src", SOURCES, ids=lambda s: str(s or "new"))
@pytest.mark.parametrize("dst", ALL, ids=str)
def test_reopen_adds_nothing_but_the_reopen_table(src: TaskState | None, dst: TaskState) -> None:
    extra = src is not None and dst in REOPEN.get(src, frozenset())
    assert can_move(src, dst, reopen=True) is (can_move(src, dst) or extra)


@given(st.lists(st.sampled_from(ALL), max_size=20))
def test_walks_through_check_move_never_leave_terminal(path: list[TaskState]) -> None:
    state: TaskState | None = None
    for dst in path:
        if can_move(state, dst):
            assert state not in TERMINAL
            state = check_move(state, dst)
        else:
            with pytest.raises(IllegalTransition):
                check_move(state, dst)
