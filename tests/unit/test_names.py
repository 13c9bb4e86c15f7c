"""Subject and token grammar: every subject lands in exactly one stream (or, for core NATS, none)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import names
from broker.provision import BusConfig, stream_configs

TOKEN_ALPHABET = "ABCXYZabcxyz0189_-"
# short random tokens plus the ones that collide with fixed subject words
tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=16) | st.sampled_from(
    ["job", "task", "retry", "cancel", "state", "log", "progress", "done", "start", "fleet", "x" * 128]
)
FAST = settings(max_examples=40, deadline=None)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is exactly one token, a final ``>`` is one or more tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, p in enumerate(pat):
        if p == ">":
            assert i == len(pat) - 1, f"'>' must be the last token of {pattern!r}"
            return len(sub) > i
        if i >= len(sub):
            return False
        if p != "*" and p != sub[i]:
            return False
    return len(sub) == len(pat)


STREAM_PATTERNS = [(sc.name or "", p) for sc in stream_configs(BusConfig()) for p in sc.subjects or []]


def streams_matching(subject: str) -> list[str]:
    return [name for name, pattern in STREAM_PATTERNS if subject_matches(pattern, subject)]


# ---- the matcher itself -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("b.>", "a.b", False),
    ],
)
def test_matcher(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


# ---- check_token ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["a", "Z", "0", "job-1", "tenant_A", "ns-thing", "a" * 128, "-_"])
def test_check_token_accepts(value: str) -> None:
    assert names.check_token(value) == value
    assert names.is_token(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 129,
        "a.b",
        "a b",
        "a*",
        "a>",
        ">",
        "*",
        "a/b",
        "é",
        "tab\there",
        "nul\x00",
        " lead",
        "trail ",
        "ns:thing",  # ':' separates attempt ids and msg ids
        "job\n",  # '$' would accept a trailing newline
        "a\n",
        "\njob",
    ],
)
def test_check_token_rejects(value: str) -> None:
    with pytest.raises(names.InvalidName) as info:
        names.check_token(value, "job id")
    msg = str(info.value)
    assert "invalid job id" in msg
    assert repr(value) in msg
    assert not names.is_token(value)


@pytest.mark.parametrize("value", [None, 5, b"abc", ["a"]])
def test_check_token_rejects_non_strings(value: object) -> None:
    with pytest.raises(names.InvalidName):
        names.check_token(value, "queue")  # type: ignore[arg-type]
    assert not names.is_token(value)


def test_invalid_name_is_value_error() -> None:
    assert issubclass(names.InvalidName, ValueError)


@FAST
@given(st.text(max_size=140))
def test_is_token_agrees_with_check_token(value: str) -> None:
    try:
        names.check_token(value)
        ok = True
    except names.InvalidName:
        ok = False
    assert names.is_token(value) is ok


@FAST
@given(tokens)
def test_generated_tokens_are_accepted(value: str) -> None:
    assert names.check_token(value) == value


# ---- subjects and streams -----------------------------------------------------------------------------
JS_BUILDERS: list[tuple[str, Callable[[str, str, str], str], str]] = [
    ("intake_job", lambda a, b, c: names.intake_job(a), names.INTAKE_STREAM),
    ("intake_task", lambda a, b, c: names.intake_task(a, b), names.INTAKE_STREAM),
    ("intake_retry", lambda a, b, c: names.intake_retry(a, b), names.INTAKE_STREAM),
    ("intake_cancel", lambda a, b, c: names.intake_cancel(a), names.INTAKE_STREAM),
    ("task_subject", lambda a, b, c: names.task_subject(a, b, c), names.TASKS_STREAM),
    ("report_start", lambda a, b, c: names.report_start(a), names.REPORTS_STREAM),
    ("report_done", lambda a, b, c: names.report_done(a, b), names.REPORTS_STREAM),
    ("event_state", lambda a, b, c: names.event_subject(a, b, names.EVENT_STATE), names.EVENTS_STREAM),
    ("event_progress", lambda a, b, c: names.event_subject(a, b, names.EVENT_PROGRESS), names.EVENTS_STREAM),
    ("event_log", lambda a, b, c: names.event_subject(a, b, names.EVENT_LOG), names.EVENTS_STREAM),
    ("job_event", lambda a, b, c: names.job_event_subject(a), names.EVENTS_STREAM),
    ("dlq", lambda a, b, c: names.dlq_subject(a), names.DLQ_STREAM),
]
CORE_BUILDERS: list[tuple[str, Callable[[str], str]]] = [
    ("heartbeat", names.heartbeat_subject),
    ("cancel", names.cancel_subject),
]


@pytest.mark.parametrize(
    ("builder", "stream"), [(b, s) for _, b, s in JS_BUILDERS], ids=[n for n, _, _ in JS_BUILDERS]
)
@FAST
@given(a=tokens, b=tokens, c=tokens)
def test_jetstream_subject_in_exactly_one_stream(
    builder: Callable[[str, str, str], str], stream: str, a: str, b: str, c: str
) -> None:
    subject = builder(a, b, c)
    assert streams_matching(subject) == [stream]
    assert names.parse(subject)[0] == subject.split(".")[1]


@pytest.mark.parametrize("builder", [b for _, b in CORE_BUILDERS], ids=[n for n, _ in CORE_BUILDERS])
@FAST
@given(a=tokens)
def test_core_subjects_match_no_stream(builder: Callable[[str], str], a: str) -> None:
    subject = builder(a)
    assert streams_matching(subject) == []


@FAST
@given(a=tokens)
def test_core_subjects_match_their_wildcards(a: str) -> None:
    assert subject_matches(names.HEARTBEATS, names.heartbeat_subject(a))
    assert subject_matches(names.CANCELS, names.cancel_subject(a))
    assert not subject_matches(names.HEARTBEATS, names.cancel_subject(a))
    assert not subject_matches(names.CANCELS, names.heartbeat_subject(a))


def test_stream_configs_are_disjoint_and_named() -> None:
    configs = stream_configs(BusConfig())
    stream_names = [sc.name for sc in configs]
    assert stream_names == [
        names.INTAKE_STREAM,
        names.TASKS_STREAM,
        names.REPORTS_STREAM,
        names.EVENTS_STREAM,
        names.DLQ_STREAM,
    ]
    second_tokens = [p.split(".")[1] for sc in configs for p in sc.subjects or []]
    assert len(second_tokens) == len(set(second_tokens)), "two streams claim the same subjects"
    for core in (names.HEARTBEATS, names.CANCELS):
        assert core.split(".")[1] not in second_tokens


def test_subject_layout() -> None:
    assert names.intake_job("j") == "fleet.intake.job.j"
    assert names.intake_task("j", "t") == "fleet.intake.task.j.t"
    assert names.intake_retry("j", "t") == "fleet.intake.retry.j.t"
    assert names.intake_cancel("j") == "fleet.intake.cancel.j"
    assert names.task_subject("q", "j", "t") == "fleet.task.q.j.t"
    assert names.report_start("w") == "fleet.report.start.w"
    assert names.report_done("j", "t") == "fleet.report.done.j.t"
    assert names.event_subject("j", "t", "state") == "fleet.event.j.t.state"
    assert names.job_event_subject("j") == "fleet.event.j.job"
    assert names.dlq_subject("intake") == "fleet.dlq.intake"
    assert names.heartbeat_subject("w") == "fleet.hb.w"
    assert names.cancel_subject("j") == "fleet.ctl.cancel.j"
    assert names.queue_consumer("gpu") == "workers-gpu"


# ---- filters ----------------------------------------------------------------------------------------
@FAST
@given(q=tokens, q2=tokens, j=tokens, j2=tokens, t=tokens)
def test_task_filters(q: str, q2: str, j: str, j2: str, t: str) -> None:
    subject = names.task_subject(q, j, t)
    assert subject_matches(names.queue_filter(q), subject)
    assert subject_matches(names.job_tasks_filter(j), subject)
    assert subject_matches(names.TASKS_SUBJECTS, subject)
    other_queue = names.task_subject(q2, j, t)
    assert subject_matches(names.queue_filter(q), other_queue) is (q == q2)
    assert subject_matches(names.job_tasks_filter(j), other_queue)
    assert subject_matches(names.job_tasks_filter(j2), subject) is (j == j2)


@FAST
@given(j=tokens, j2=tokens, t=tokens, t2=tokens, w=tokens)
def test_report_and_event_filters(j: str, j2: str, t: str, t2: str, w: str) -> None:
    assert subject_matches(names.job_results_filter(j), names.report_done(j, t))
    assert subject_matches(names.job_results_filter(j2), names.report_done(j, t)) is (j == j2)
    assert not subject_matches(names.job_results_filter(j), names.report_start(w))

    for kind in (names.EVENT_STATE, names.EVENT_PROGRESS, names.EVENT_LOG):
        ev = names.event_subject(j, t, kind)
        assert subject_matches(names.job_events_filter(j), ev)
        assert subject_matches(names.task_events_filter(j, t), ev)
        assert subject_matches(names.task_events_filter(j, t2), ev) is (t == t2)
        assert subject_matches(names.job_states_filter(j), ev) is (kind == names.EVENT_STATE)
    job_ev = names.job_event_subject(j)
    assert subject_matches(names.job_events_filter(j), job_ev)
    assert not subject_matches(names.job_states_filter(j), job_ev)
    assert not subject_matches(names.task_events_filter(j, t), job_ev)


@pytest.mark.parametrize(
    ("filt", "stream"),
    [
        (names.queue_filter("q"), names.TASKS_STREAM),
        (names.job_tasks_filter("j"), names.TASKS_STREAM),
        (names.job_results_filter("j"), names.REPORTS_STREAM),
        (names.job_events_filter("j"), names.EVENTS_STREAM),
        (names.task_events_filter("j", "t"), names.EVENTS_STREAM),
        (names.job_states_filter("j"), names.EVENTS_STREAM),
        (names.INTAKE_SUBJECTS, names.INTAKE_STREAM),
        (names.REPORTS_SUBJECTS, names.REPORTS_STREAM),
    ],
)
def test_filters_select_within_one_stream(filt: str, stream: str) -> None:
    # make a concrete subject out of the filter and check it lands in the stream the filter is used on
    concrete = ".".join({"*": "x", ">": "y.z"}.get(tok, tok) for tok in filt.split("."))
    assert subject_matches(filt, concrete)
    assert streams_matching(concrete) == [stream]


# ---- task_of -------------------------------------------------------------------------------------------
@FAST
@given(j=tokens, t=tokens, q=tokens)
def test_task_of_task_subjects(j: str, t: str, q: str) -> None:
    for subject in (
        names.intake_task(j, t),
        names.intake_retry(j, t),
        names.report_done(j, t),
        names.task_subject(q, j, t),
    ):
        assert names.task_of(subject) == (j, t), subject


@FAST
@given(j=tokens, t=tokens, w=tokens)
def test_task_of_other_subjects(j: str, t: str, w: str) -> None:
    for subject in (
        names.intake_job(j),
        names.intake_cancel(j),
        names.report_start(w),
        names.event_subject(j, t, names.EVENT_STATE),
        names.job_event_subject(j),
        names.dlq_subject(w),
        names.heartbeat_subject(w),
        names.cancel_subject(j),
        f"other.intake.task.{j}.{t}",
        f"{names.intake_task(j, t)}.extra",
    ):
        assert names.task_of(subject) == (None, None), subject


@pytest.mark.parametrize(
    "subject", ["", "fleet", "fleet.intake.task.j*.t", "fleet.report.done.j.t>", "fleet.intake.task..t"]
)
def test_task_of_rejects_bad_tokens(subject: str) -> None:
    assert names.task_of(subject) == (None, None)


# ---- parse ------------------------------------------------------------------------------------------
def test_parse() -> None:
    assert names.parse("fleet.report.done.j.t") == ["report", "done", "j", "t"]
    assert names.parse(names.heartbeat_subject("w")) == ["hb", "w"]


@pytest.mark.parametrize("subject", ["", "fleet", "other.intake.job.j", "FLEET.task.q.j.t"])
def test_parse_rejects_foreign_subjects(subject: str) -> None:
    with pytest.raises(names.InvalidName, match="not a fleet subject"):
        names.parse(subject)
