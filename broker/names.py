"""Every stream, subject, consumer and bucket name fleet uses, in one place.

Grammar: one prefix (``fleet``), ``.`` between subject tokens, ``_`` in stream and
bucket names, and the second token names the kind of traffic:

=========================================  ================  ==========================================
subject                                    stream            what travels on it
=========================================  ================  ==========================================
``fleet.intake.job.<job>``                 FLEET_INTAKE (WQ) a job declaration (client -> scheduler)
``fleet.intake.task.<job>.<task>``         FLEET_INTAKE      one task submission (client -> scheduler)
``fleet.intake.retry.<job>.<task>``        FLEET_INTAKE      a retry the scheduler scheduled for later
``fleet.intake.cancel.<job>``              FLEET_INTAKE      a cancellation request
``fleet.task.<queue>.<job>.<task>``        FLEET_TASKS (WQ)  admitted work, pulled by workers
``fleet.report.start.<worker>``            FLEET_REPORTS     a worker started a batch of deliveries
``fleet.report.done.<job>.<task>``         FLEET_REPORTS     the outcome of one attempt (the result)
``fleet.event.<job>.<task>.<kind>``        FLEET_EVENTS      state changes, progress, log lines
``fleet.event.<job>.job``                  FLEET_EVENTS      job-level summary (counts by state)
``fleet.dlq.<origin>``                     FLEET_DLQ         dead letters: undecodable or rejected input
``fleet.hb.<worker>``                      (core NATS)       worker liveness and load
``fleet.ctl.cancel.<job>``                 (core NATS)       tells workers to stop a job's running tasks
=========================================  ================  ==========================================

KV buckets: ``fleet_jobs`` (one record per job). Object store: ``fleet_blobs`` (offloaded payloads).

User-supplied identifiers (job ids, task ids, queue names, tenants, worker ids) become subject
tokens, so they are checked by :func:`check_token` before they reach a subject.
"""

from __future__ import annotations

import re

PREFIX = "fleet"

# Streams
INTAKE_STREAM = "FLEET_INTAKE"
TASKS_STREAM = "FLEET_TASKS"
REPORTS_STREAM = "FLEET_REPORTS"
EVENTS_STREAM = "FLEET_EVENTS"
DLQ_STREAM = "FLEET_DLQ"

# Durable consumers
INTAKE_CONSUMER = "scheduler-intake"
REPORTS_CONSUMER = "scheduler-reports"

# KV buckets and object store
JOBS_BUCKET = "fleet_jobs"
BLOBS_BUCKET = "fleet_blobs"

# Event kinds (last token of an event subject)
EVENT_STATE = "state"
EVENT_PROGRESS = "progress"
EVENT_LOG = "log"
EVENT_JOB = "job"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


class InvalidName(ValueError):
    """A user-supplied identifier cannot be used as a subject token."""


def check_token(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe subject token, else raise :class:`InvalidName`."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 _ -")
    return value


def is_token(value: object) -> bool:
    return isinstance(value, str) and bool(_TOKEN.fullmatch(value))


# ---- intake -------------------------------------------------------------------------------------
INTAKE_SUBJECTS = f"{PREFIX}.intake.>"


def intake_job(job: str) -> str:
    return f"{PREFIX}.intake.job.{job}"


def intake_task(job: str, task: str) -> str:
    return f"{PREFIX}.intake.task.{job}.{task}"


def intake_retry(job: str, task: str) -> str:
    return f"{PREFIX}.intake.retry.{job}.{task}"


def intake_cancel(job: str) -> str:
    return f"{PREFIX}.intake.cancel.{job}"


# ---- work ---------------------------------------------------------------------------------------
TASKS_SUBJECTS = f"{PREFIX}.task.>"


def task_subject(queue: str, job: str, task: str) -> str:
    return f"{PREFIX}.task.{queue}.{job}.{task}"


def queue_filter(queue: str) -> str:
    """The filter of the one work-queue consumer that serves ``queue``."""
    return f"{PREFIX}.task.{queue}.>"


def job_tasks_filter(job: str) -> str:
    """All queued work of one job, across queues (used to purge on cancel)."""
    return f"{PREFIX}.task.*.{job}.*"


def queue_consumer(queue: str) -> str:
    return f"workers-{queue}"


# ---- reports ------------------------------------------------------------------------------------
REPORTS_SUBJECTS = f"{PREFIX}.report.>"


def report_start(worker: str) -> str:
    return f"{PREFIX}.report.start.{worker}"


def report_done(job: str, task: str) -> str:
    return f"{PREFIX}.report.done.{job}.{task}"


def job_results_filter(job: str) -> str:
    return f"{PREFIX}.report.done.{job}.*"


# ---- events -------------------------------------------------------------------------------------
EVENTS_SUBJECTS = f"{PREFIX}.event.>"


def event_subject(job: str, task: str, kind: str) -> str:
    return f"{PREFIX}.event.{job}.{task}.{kind}"


def job_event_subject(job: str) -> str:
    return f"{PREFIX}.event.{job}.{EVENT_JOB}"


def job_events_filter(job: str) -> str:
    return f"{PREFIX}.event.{job}.>"


def task_events_filter(job: str, task: str) -> str:
    return f"{PREFIX}.event.{job}.{task}.*"


def job_states_filter(job: str) -> str:
    return f"{PREFIX}.event.{job}.*.{EVENT_STATE}"


# ---- dead letters, liveness, control --------------------------------------------------------------
DLQ_SUBJECTS = f"{PREFIX}.dlq.>"


def dlq_subject(origin: str) -> str:
    return f"{PREFIX}.dlq.{origin}"


HEARTBEATS = f"{PREFIX}.hb.*"


def heartbeat_subject(worker: str) -> str:
    return f"{PREFIX}.hb.{worker}"


CANCELS = f"{PREFIX}.ctl.cancel.*"


def cancel_subject(job: str) -> str:
    return f"{PREFIX}.ctl.cancel.{job}"


def task_of(subject: str) -> tuple[str | None, str | None]:
    """(job, task) named by an intake task/retry, a task or a done-report subject, else (None, None)."""
    t = subject.split(".")
    if t[0] != PREFIX or (len(t) != 5 and len(t) != 6):
        return None, None
    if (
        (t[1] == "intake" and t[2] in ("task", "retry") and len(t) == 5)
        or (t[1] == "report" and t[2] == "done" and len(t) == 5)
        or (t[1] == "task" and len(t) == 5)
    ):
        job, task = t[3], t[4]
    else:
        return None, None
    return (job, task) if is_token(job) and is_token(task) else (None, None)


def parse(subject: str) -> list[str]:
    """Split a fleet subject into its tokens after the prefix (``[kind, ...]``)."""
    parts = subject.split(".")
    if len(parts) < 2 or parts[0] != PREFIX:
        raise InvalidName(f"not a fleet subject: {subject!r}")
    return parts[1:]
