"""The handler allow-list (``fleet worker --allow``)."""

from __future__ import annotations

import pytest

from fleet.worker.allow import AllowList
from fleet.worker.errors import HandlerNotAllowed, InvalidTask


@pytest.mark.parametrize(
    "handler",
    [
        "os:system",
        "os.path:join",
        "subprocess:run",
        "builtins:eval",
        "sys:exit",
        "time:sleep",
        "importlib:import_module",
        "json:loads",
        "_thread:start_new_thread",
        "posix:system",
    ],
)
def test_default_refuses_the_standard_library(handler: str) -> None:
    allow = AllowList()
    assert not allow.allows(handler)
    with pytest.raises(HandlerNotAllowed) as info:
        allow.check(handler)
    assert "standard-library" in str(info.value) and "--allow" in str(info.value)
    assert handler in str(info.value)


@pytest.mark.parametrize(
    "handler", ["handlers:square", "fleet.examples.montecarlo:estimate", "mypkg.tasks:run", "oslo:f"]
)
def test_default_allows_other_modules(handler: str) -> None:
    AllowList().check(handler)


@pytest.mark.parametrize(
    ("handler", "ok"),
    [
        ("mypkg:f", True),
        ("mypkg.sub.mod:f", True),
        ("mypkgx:f", False),
        ("mypkg_other.mod:f", False),
        ("other:f", False),
        ("fleet.examples.montecarlo:estimate", True),
        ("fleet.examples:x", True),
        ("fleet.worker.runtime:serve", False),
        ("os:system", False),
    ],
)
def test_prefixes(handler: str, ok: bool) -> None:
    allow = AllowList(["mypkg", "fleet.examples."])
    assert allow.allows(handler) is ok
    if not ok:
        with pytest.raises(HandlerNotAllowed, match=r"only runs handlers under 'mypkg', 'fleet\.examples'"):
            allow.check(handler)


def test_prefixes_may_name_standard_modules_explicitly() -> None:
    assert AllowList(["time"]).allows("time:sleep")


def test_refusal_is_an_invalid_task() -> None:
    assert issubclass(HandlerNotAllowed, InvalidTask)
    assert HandlerNotAllowed.retryable is False


def test_blank_prefixes_are_ignored() -> None:
    assert AllowList(["", " ", "."]).prefixes == ()
    assert AllowList(["", "a"]).describe() == "a"
    assert AllowList().describe() == "anything but the standard library"
