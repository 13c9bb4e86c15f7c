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
    ("intake_cancel_task", lambda a, b, c: names.intake_cancel(a, b), names.INTAKE_STREAM),
    ("task_subject", lambda a, b, c: names.task_subject(a, b, c), names.TASKS_STREAM),
    ("report_start", lambda a, b, c: names.report_start(a), names.REPORTS_STREAM),
    ("report_done", lambda a, b, c: names.report_done(a, b), names.REPORTS_STREAM),
    ("state", lambda a, b, c: names.state_subject(a, b), names.STATE_STREAM),
    ("result", lambda a, b, c: names.result_subject(a, b), names.RESULTS_STREAM),
    ("event_state", lambda a, b, c: names.event_subject(a, b, names.EVENT_STATE), names.EVENTS_STREAM),
    ("event_progress", lambda a, b, c: names.event_subject(a, b, names.EVENT_PROGRESS), names.EVENTS_STREAM),
    ("event_log", lambda a, b, c: names.event_subject(a, b, names.EVENT_LOG), names.EVENTS_STREAM),
    ("job_event", lambda a, b, c: names.job_event_subject(a), names.EVENTS_STREAM),
    ("dlq", lambda a, b, c: names.dlq_subject(a), names.DLQ_STREAM),
    ("dlq_task", lambda a, b, c: names.dlq_task_subject(a, b), names.DLQ_STREAM),
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
        names.STATE_STREAM,
        names.RESULTS_STREAM,
        names.EVENTS_STREAM,
        names.DLQ_STREAM,
    ]
    kinds = [{p.split(".")[1] for p in sc.subjects or []} for sc in configs]
    assert all(kinds), "a stream without subjects"
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert a.isdisjoint(b), "two streams claim the same subjects"
    for core in (names.HEARTBEATS, names.CANCELS):
        assert all(core.split(".")[1] not in k for k in kinds)


@FAST
@given(kind=tokens, j=tokens)
def test_intake_stores_only_its_kinds(kind: str, j: str) -> None:
    subject = f"fleet.intake.{kind}.{j}"
    stored = kind in ("job", "task", "cancel", "retry")
    assert (streams_matching(subject) == [names.INTAKE_STREAM]) is stored
    assert streams_matching(f"fleet.intake.{kind}") == []


def test_subject_layout() -> None:
    assert names.intake_job("j") == "fleet.intake.job.j"
    assert names.intake_task("j", "t") == "fleet.intake.task.j.t"
    assert names.intake_retry("j", "t") == "fleet.intake.retry.j.t"
    assert names.intake_cancel("j") == "fleet.intake.cancel.j"
    assert names.intake_cancel("j", "t") == "fleet.intake.cancel.j.t"
    assert names.task_subject("q", "j", "t") == "fleet.task.q.j.t"
    assert names.report_start("w") == "fleet.report.start.w"
    assert names.report_done("j", "t") == "fleet.report.done.j.t"
    assert names.state_subject("j", "t") == "fleet.state.j.t"
    assert names.result_subject("j", "t") == "fleet.result.j.t"
    assert names.dlq_task_subject("j", "t") == "fleet.dlq.task.j.t"
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
def test_state_result_and_event_filters(j: str, j2: str, t: str, t2: str, w: str) -> None:
    assert subject_matches(names.job_results_filter(j), names.result_subject(j, t))
    assert subject_matches(names.job_results_filter(j2), names.result_subject(j, t)) is (j == j2)
    assert not subject_matches(names.job_results_filter(j), names.report_done(j, t))
    assert subject_matches(names.job_state_filter(j), names.state_subject(j, t))
    assert subject_matches(names.job_state_filter(j2), names.state_subject(j, t)) is (j == j2)
    assert subject_matches(names.job_dlq_filter(j), names.dlq_task_subject(j, t))
    assert subject_matches(names.job_dlq_filter(j2), names.dlq_task_subject(j, t)) is (j == j2)
    assert subject_matches(names.DLQ_TASKS, names.dlq_task_subject(j, t))
    assert not subject_matches(names.DLQ_TASKS, names.dlq_subject(w))
    assert not subject_matches(names.job_state_filter(j), names.report_start(w))

    for kind in (names.EVENT_STATE, names.EVENT_PROGRESS, names.EVENT_LOG):
        ev = names.event_subject(j, t, kind)
        assert subject_matches(names.job_events_filter(j), ev)
        assert subject_matches(names.task_events_filter(j, t), ev)
        assert subject_matches(names.task_events_filter(j, t2), ev) is (t == t2)
    job_ev = names.job_event_subject(j)
    assert subject_matches(names.job_events_filter(j), job_ev)
    assert not subject_matches(names.task_events_filter(j, t), job_ev)


def _transform(src: str, dest: str, subject: str) -> str | None:
    """Apply a NATS subject transform (``{{wildcard(n)}}`` is the n-th ``*`` of ``src``)."""
    if not subject_matches(src, subject):
        return None
    wild = [tok for p, tok in zip(src.split("."), subject.split("."), strict=True) if p == "*"]
    out = dest
    for i, tok in enumerate(wild, start=1):
        out = out.replace(f"{{{{wildcard({i})}}}}", tok)
    return out


@FAST
@given(j=tokens, t=tokens)
def test_state_records_are_sourced_into_the_task_history(j: str, t: str) -> None:
    src, dest = names.STATE_TO_EVENT
    event = _transform(src, dest, names.state_subject(j, t))
    assert event == names.event_subject(j, t, names.EVENT_STATE)
    assert streams_matching(event) == [names.EVENTS_STREAM]
    assert subject_matches(names.task_events_filter(j, t), event)
    assert _transform(src, dest, names.result_subject(j, t)) is None


def test_the_state_stream_republishes_into_the_history() -> None:
    (state,) = [sc for sc in stream_configs(BusConfig()) if sc.name == names.STATE_STREAM]
    assert state.republish is not None
    assert (state.republish.src, state.republish.dest) == names.STATE_TO_EVENT
    (events,) = [sc for sc in stream_configs(BusConfig()) if sc.name == names.EVENTS_STREAM]
    assert events.subjects == [names.EVENTS_SUBJECTS]
    assert "fleet.event.j.t.state".startswith(names.EVENTS_SUBJECTS[:-1])  # captured by FLEET_EVENTS


@pytest.mark.parametrize("stream", [names.INTAKE_STREAM, names.STATE_STREAM, names.RESULTS_STREAM])
def test_record_streams_keep_one_message_per_subject(stream: str) -> None:
    (sc,) = [sc for sc in stream_configs(BusConfig()) if sc.name == stream]
    assert sc.max_msgs_per_subject == 1
    assert not sc.max_age  # records are removed with their job, never by age


@FAST
@given(j=tokens, j2=tokens, t=tokens, r=tokens)
def test_job_intake_filters_cover_everything_a_job_submitted(j: str, j2: str, t: str, r: str) -> None:
    filters = names.job_intake_filters(j)
    mine = [
        names.intake_job(j),
        names.intake_task(j, t),
        names.intake_cancel(j),
        names.intake_cancel(j, t),
        names.intake_retry(j, r),
    ]
    for subject in mine:
        assert any(subject_matches(f, subject) for f in filters), subject
        assert streams_matching(subject) == [names.INTAKE_STREAM]
    if j != j2:
        others = [names.intake_job(j2), names.intake_task(j2, t), names.intake_cancel(j2, t)]
        for subject in others:
            assert not any(subject_matches(f, subject) for f in filters), subject


@FAST
@given(j=tokens, t=tokens, r=tokens)
def test_control_filters_select_declarations_cancels_and_retries(j: str, t: str, r: str) -> None:
    def control(subject: str) -> bool:
        return any(subject_matches(f, subject) for f in names.CONTROL_FILTERS)

    assert control(names.intake_job(j))
    assert control(names.intake_cancel(j))
    assert control(names.intake_cancel(j, t))
    assert control(names.intake_retry(j, r))
    assert not control(names.intake_task(j, t))
    assert subject_matches(names.INTAKE_TASKS, names.intake_task(j, t))
    assert not subject_matches(names.INTAKE_TASKS, names.intake_retry(j, r))


@pytest.mark.parametrize(
    ("filt", "stream"),
    [
        (names.queue_filter("q"), names.TASKS_STREAM),
        (names.job_tasks_filter("j"), names.TASKS_STREAM),
        (names.job_results_filter("j"), names.RESULTS_STREAM),
        (names.job_state_filter("j"), names.STATE_STREAM),
        (names.job_dlq_filter("j"), names.DLQ_STREAM),
        (names.job_events_filter("j"), names.EVENTS_STREAM),
        (names.task_events_filter("j", "t"), names.EVENTS_STREAM),
        *[(f, names.INTAKE_STREAM) for f in names.INTAKE_SUBJECTS],
        (names.INTAKE_TASKS, names.INTAKE_STREAM),
        (names.REPORTS_SUBJECTS, names.REPORTS_STREAM),
        (names.STATE_SUBJECTS, names.STATE_STREAM),
        (names.RESULTS_SUBJECTS, names.RESULTS_STREAM),
        (names.DLQ_TASKS, names.DLQ_STREAM),
        *[(f, names.INTAKE_STREAM) for f in names.CONTROL_FILTERS],
        *[(f, names.INTAKE_STREAM) for f in names.job_intake_filters("j")],
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
        names.report_done(j, t),
        names.task_subject(q, j, t),
        names.state_subject(j, t),
        names.result_subject(j, t),
    ):
        assert names.task_of(subject) == (j, t), subject


@FAST
@given(j=tokens, t=tokens, w=tokens)
def test_task_of_other_subjects(j: str, t: str, w: str) -> None:
    for subject in (
        names.intake_job(j),
        names.intake_cancel(j),
        names.intake_retry(j, t),  # names a request, not a task
        names.report_start(w),
        names.event_subject(j, t, names.EVENT_STATE),
        names.job_event_subject(j),
        names.dlq_subject(w),
        names.heartbeat_subject(w),
        names.cancel_subject(j),
        f"other.intake.task.{j}.{t}",
        f"{names.intake_task(j, t)}.extra",
        f"{names.state_subject(j, t)}.extra",
    ):
        assert names.task_of(subject) == (None, None), subject


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "fleet",
        "fleet.intake.task.j*.t",
        "fleet.report.done.j.t>",
        "fleet.intake.task..t",
        "fleet.state.j.t t",
        "fleet.result..t",
    ],
)
def test_task_of_rejects_bad_tokens(subject: str) -> None:
    assert names.task_of(subject) == (None, None)


# ---- message ids (de-duplication) ---------------------------------------------------------------------
ints = st.integers(0, 10**12)


@FAST
@given(a=st.tuples(tokens, tokens, ints, ints), b=st.tuples(tokens, tokens, ints, ints))
def test_dispatch_ids_are_unique_per_job_task_attempt_and_dispatch(
    a: tuple[str, str, int, int], b: tuple[str, str, int, int]
) -> None:
    assert (names.msgid_dispatch(*a) == names.msgid_dispatch(*b)) is (a == b)


@FAST
@given(a=st.tuples(tokens, tokens, ints), b=st.tuples(tokens, tokens, ints))
def test_per_revision_and_per_token_ids_are_unique(a: tuple[str, str, int], b: tuple[str, str, int]) -> None:
    assert (names.msgid_state(*a) == names.msgid_state(*b)) is (a == b)
    assert (names.msgid_done(*a) == names.msgid_done(*b)) is (a == b)


@FAST
@given(a=st.tuples(tokens, tokens), b=st.tuples(tokens, tokens))
def test_per_task_ids_are_unique(a: tuple[str, str], b: tuple[str, str]) -> None:
    for fn in (names.msgid_submit, names.msgid_cancel):
        assert (fn(*a) == fn(*b)) is (a == b), fn.__name__
    assert (names.msgid_result(*a, 1) == names.msgid_result(*b, 1)) is (a == b)
    assert (names.msgid_dead(*a, 1, 2) == names.msgid_dead(*b, 1, 2)) is (a == b)
    assert names.msgid_result(*a, 1) != names.msgid_result(*a, 2)  # a retried task's new result is stored
    assert names.msgid_dead(*a, 1, 2) != names.msgid_dead(*a, 1, 3)
    assert names.msgid_cancel(a[0]) != names.msgid_cancel(*a)
    assert (names.msgid_start(a[0], 7) == names.msgid_start(b[0], 7)) is (a[0] == b[0])
    assert names.msgid_start(a[0], 7) != names.msgid_start(a[0], 8)


@FAST
@given(j=tokens, t=tokens, n=ints)
def test_message_id_kinds_never_collide(j: str, t: str, n: int) -> None:
    ids = [
        names.msgid_job(j),
        names.msgid_submit(j, t),
        names.msgid_cancel(j),
        names.msgid_cancel(j, t),
        names.msgid_dispatch(j, t, n, n),
        names.msgid_state(j, t, n),
        names.msgid_result(j, t, n),
        names.msgid_start(j, n),
        names.msgid_done(j, t, n),
        names.msgid_dead(j, t, n, n),
        names.msgid_idempotent(j, t),
    ]
    assert len(set(ids)) == len(ids)


def test_message_id_layout() -> None:
    assert names.msgid_dispatch("j", "t", 2, 5) == "dispatch:j/t:2.5"
    assert names.msgid_state("j", "t", 3) == "state:j/t:3"
    assert names.msgid_result("j", "t", 2) == "result:j/t:2"
    assert names.msgid_done("j", "t", 7001) == "done:j/t:7001"
    assert names.msgid_dead("j", "t", 2, 3) == "dead:j/t:2.3"
    assert names.msgid_start("w", 7001) == "start:w:7001"


# ---- parse ------------------------------------------------------------------------------------------
def test_parse() -> None:
    assert names.parse("fleet.report.done.j.t") == ["report", "done", "j", "t"]
    assert names.parse(names.heartbeat_subject("w")) == ["hb", "w"]


@pytest.mark.parametrize("subject", ["", "fleet", "other.intake.job.j", "FLEET.task.q.j.t"])
def test_parse_rejects_foreign_subjects(subject: str) -> None:
    with pytest.raises(names.InvalidName, match="not a fleet subject"):
        names.parse(subject)
