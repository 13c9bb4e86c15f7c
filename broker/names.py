"""Every stream, subject, consumer, bucket and message-id fleet uses, in one place.

Grammar: one prefix (``fleet``), ``.`` between subject tokens, ``_`` in stream and bucket names,
and the second token names the kind of traffic:

=========================================  ==================  ==========================================
subject                                    stream              what travels on it
=========================================  ==================  ==========================================
``fleet.intake.job.<job>``                 FLEET_INTAKE (1/s)  a job declaration (client -> scheduler)
``fleet.intake.task.<job>.<task>``         FLEET_INTAKE        one task's envelope, kept until archive
``fleet.intake.cancel.<job>[.<task>]``     FLEET_INTAKE        a cancellation request (kept: it sticks)
``fleet.intake.retry.<job>.<request>``     FLEET_INTAKE        re-run a job's failed tasks (``fleet retry``)
``fleet.intake.prio.<job>.<request>``      FLEET_INTAKE        change waiting tasks' priority (``fleet prioritize``)
``fleet.task.<queue>.<job>.<task>``        FLEET_TASKS (WQ)    one dispatch of a task, pulled by workers
``fleet.report.start.<worker>``            FLEET_REPORTS (WQ)  a worker started a batch of deliveries
``fleet.report.done.<job>.<task>``         FLEET_REPORTS       the outcome of one delivery
``fleet.state.<job>.<task>``               FLEET_STATE (1/s)   the task's state of record (TaskRecord)
``fleet.result.<job>.<task>``              FLEET_RESULTS (1/s) the accepted outcome (a DoneReport)
``fleet.event.<job>.<task>.<kind>``        FLEET_EVENTS        history: progress, log, state (republished)
``fleet.event.<job>.job``                  FLEET_EVENTS        job-level summary (counts by state)
``fleet.dlq.<origin>``                     FLEET_DLQ           undecodable or rejected input
``fleet.dlq.task.<job>.<task>``            FLEET_DLQ           a task that ended dead, and why
``fleet.hb.<worker>``                      (core NATS)         heartbeat request; the reply fences
``fleet.ctl.cancel.<job>``                 (core NATS)         fast path: stop a job's running tasks
``fleet.ctl.tokens.<limiter>``             (core NATS)         request a lease of rate-limit tokens
``fleet.ctl.policy``                       (core NATS)         hint: the policy in KV changed
=========================================  ==================  ==========================================

"1/s" streams keep one message per subject and no age limit: they are records, removed only when
their job is archived. KV bucket ``fleet_jobs`` holds one JobRecord per job (no TTL); KV bucket ``fleet_policy`` holds
the scheduling policy (key ``policy``, YAML text) and usage accounting (``usage.<tenant>``); object store
``fleet_blobs`` holds offloaded payloads under ``<job>/sha256:<hex>``.

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
STATE_STREAM = "FLEET_STATE"
RESULTS_STREAM = "FLEET_RESULTS"
EVENTS_STREAM = "FLEET_EVENTS"
DLQ_STREAM = "FLEET_DLQ"

# Durable consumers
INTAKE_CONSUMER = "scheduler-intake"
CONTROL_CONSUMER = "scheduler-control"
REPORTS_CONSUMER = "scheduler-reports"

# KV buckets and object store
JOBS_BUCKET = "fleet_jobs"
BLOBS_BUCKET = "fleet_blobs"
JOBS_KV_SUBJECTS = f"$KV.{JOBS_BUCKET}.>"
JOBS_KV_STREAM = f"KV_{JOBS_BUCKET}"
POLICY_BUCKET = "fleet_policy"
POLICY_KEY = "policy"
"""The scheduling policy (YAML text, validated by ``fleet.policy.config``) in ``POLICY_BUCKET``."""


def usage_key(tenant: str) -> str:
    """A tenant's usage accounting (``fleet.policy.budget.Usage``) in ``POLICY_BUCKET``."""
    return f"usage.{check_token(tenant, 'tenant')}"


# Event kinds (last token of an event subject)
EVENT_STATE = "state"
EVENT_PROGRESS = "progress"
EVENT_LOG = "log"
EVENT_JOB = "job"

# Headers fleet sets on dispatched tasks
HDR_ATTEMPT = "Fleet-Attempt"
HDR_DISPATCH = "Fleet-Dispatch"

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


# ---- intake (the task store) ----------------------------------------------------------------------
INTAKE_TASKS = f"{PREFIX}.intake.task.>"
CONTROL_FILTERS = (
    f"{PREFIX}.intake.job.>",
    f"{PREFIX}.intake.cancel.>",
    f"{PREFIX}.intake.retry.>",
    f"{PREFIX}.intake.prio.>",
)
INTAKE_SUBJECTS = (INTAKE_TASKS, *CONTROL_FILTERS)
"""Only these kinds are stored: a publish to any other ``fleet.intake.*`` subject is refused at once."""


def intake_job(job: str) -> str:
    return f"{PREFIX}.intake.job.{job}"


def intake_task(job: str, task: str) -> str:
    return f"{PREFIX}.intake.task.{job}.{task}"


def intake_cancel(job: str, task: str | None = None) -> str:
    return f"{PREFIX}.intake.cancel.{job}" + (f".{task}" if task else "")


def intake_retry(job: str, request: str) -> str:
    return f"{PREFIX}.intake.retry.{job}.{request}"


def intake_prioritize(job: str, request: str) -> str:
    return f"{PREFIX}.intake.prio.{job}.{request}"


def job_intake_filters(job: str) -> tuple[str, ...]:
    """Everything a job left in the intake stream (purged when the job is archived)."""
    p = f"{PREFIX}.intake"
    return (
        f"{p}.job.{job}",
        f"{p}.task.{job}.*",
        f"{p}.cancel.{job}",
        f"{p}.cancel.{job}.*",
        f"{p}.retry.{job}.*",
        f"{p}.prio.{job}.*",
    )


# ---- work ---------------------------------------------------------------------------------------
TASKS_SUBJECTS = f"{PREFIX}.task.>"


def task_subject(queue: str, job: str, task: str) -> str:
    return f"{PREFIX}.task.{queue}.{job}.{task}"


PLACED_PREFIX = "_w-"


def placed_queue(worker: str) -> str:
    """The pseudo-queue of one worker: tasks placed on it (they asked for resources) go only there."""
    return f"{PLACED_PREFIX}{worker}"


def queue_filter(queue: str) -> str:
    """The filter of the one work-queue consumer that serves ``queue``."""
    return f"{PREFIX}.task.{queue}.>"


def job_tasks_filter(job: str) -> str:
    """All dispatched work of one job, across queues (purged on cancel)."""
    return f"{PREFIX}.task.*.{job}.*"


def queue_consumer(queue: str) -> str:
    return f"workers-{queue}"


# ---- reports, state of record, results -------------------------------------------------------------
REPORTS_SUBJECTS = f"{PREFIX}.report.>"
STATE_SUBJECTS = f"{PREFIX}.state.>"
RESULTS_SUBJECTS = f"{PREFIX}.result.>"


def report_start(worker: str) -> str:
    return f"{PREFIX}.report.start.{worker}"


def report_done(job: str, task: str) -> str:
    return f"{PREFIX}.report.done.{job}.{task}"


def state_subject(job: str, task: str) -> str:
    return f"{PREFIX}.state.{job}.{task}"


def job_state_filter(job: str) -> str:
    return f"{PREFIX}.state.{job}.*"


def result_subject(job: str, task: str) -> str:
    return f"{PREFIX}.result.{job}.{task}"


def job_results_filter(job: str) -> str:
    return f"{PREFIX}.result.{job}.*"


# ---- events (history) -----------------------------------------------------------------------------
EVENTS_SUBJECTS = f"{PREFIX}.event.>"
STATE_TO_EVENT = (
    f"{PREFIX}.state.*.*",
    f"{PREFIX}.event.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{EVENT_STATE}",
)
"""RePublish mapping that copies every stored state of record into the history, in order."""


def event_subject(job: str, task: str, kind: str) -> str:
    return f"{PREFIX}.event.{job}.{task}.{kind}"


def job_event_subject(job: str) -> str:
    return f"{PREFIX}.event.{job}.{EVENT_JOB}"


def budget_notice_subject(tenant: str) -> str:
    """A tenant's budget warnings (in FLEET_EVENTS: no job or task is named ``_tenant``'s kind)."""
    return f"{PREFIX}.event._tenant.{tenant}.budget"


BUDGET_NOTICES = f"{PREFIX}.event._tenant.*.budget"


def job_events_filter(job: str) -> str:
    return f"{PREFIX}.event.{job}.>"


def job_state_history_filter(job: str) -> str:
    """Every state change of a job's tasks, in the history."""
    return f"{PREFIX}.event.{job}.*.{EVENT_STATE}"


def task_events_filter(job: str, task: str) -> str:
    return f"{PREFIX}.event.{job}.{task}.*"


# ---- dead letters, liveness, control --------------------------------------------------------------
DLQ_SUBJECTS = f"{PREFIX}.dlq.>"
DLQ_TASKS = f"{PREFIX}.dlq.task.>"


def dlq_subject(origin: str) -> str:
    return f"{PREFIX}.dlq.{origin}"


def dlq_task_subject(job: str, task: str) -> str:
    return f"{PREFIX}.dlq.task.{job}.{task}"


def job_dlq_filter(job: str) -> str:
    return f"{PREFIX}.dlq.task.{job}.*"


HEARTBEATS = f"{PREFIX}.hb.*"


def heartbeat_subject(worker: str) -> str:
    return f"{PREFIX}.hb.{worker}"


CANCELS = f"{PREFIX}.ctl.cancel.*"
POLICY_CHANGED = f"{PREFIX}.ctl.policy"
TOKENS = f"{PREFIX}.ctl.tokens.*"


def tokens_subject(limiter: str) -> str:
    """Request/reply: a worker asks the scheduler for a lease of ``limiter``'s tokens."""
    return f"{PREFIX}.ctl.tokens.{check_token(limiter, 'limiter')}"


def cancel_subject(job: str) -> str:
    return f"{PREFIX}.ctl.cancel.{job}"


# ---- object store names -----------------------------------------------------------------------------
def blob_name(job: str, ref: str) -> str:
    """Offloaded payloads are scoped to their job, so they live and die with it."""
    return f"{job}/{ref}"


# ---- Nats-Msg-Id grammar (de-duplication) ------------------------------------------------------------
def msgid_job(job: str) -> str:
    return f"job:{job}"


def msgid_submit(job: str, task: str) -> str:
    return f"task:{job}/{task}"


def msgid_idempotent(tenant: str, key: str) -> str:
    return f"idem:{tenant}:{key}"


def msgid_cancel(job: str, task: str | None = None) -> str:
    return f"cancel:{job}" + (f"/{task}" if task else "")


def msgid_dispatch(job: str, task: str, attempt: int, dispatch: int) -> str:
    return f"dispatch:{job}/{task}:{attempt}.{dispatch}"


def msgid_state(job: str, task: str, rev: int) -> str:
    return f"state:{job}/{task}:{rev}"


def msgid_result(job: str, task: str, attempt: int) -> str:
    return f"result:{job}/{task}:{attempt}"


def msgid_start(worker: str, token: int) -> str:
    """A start report, named by its worker and the first token of its batch."""
    return f"start:{worker}:{token}"


def msgid_done(job: str, task: str, token: int) -> str:
    return f"done:{job}/{task}:{token}"


def msgid_prioritize(job: str, request: str) -> str:
    return f"prio:{job}/{request}"


def msgid_notice(tenant: str, resource: str, threshold: float, period: int) -> str:
    return f"notice:{tenant}:{resource}:{threshold:g}:{period}"


def msgid_dead(job: str, task: str, attempt: int, dispatch: int) -> str:
    return f"dead:{job}/{task}:{attempt}.{dispatch}"


# ---- parsing --------------------------------------------------------------------------------------
_TASK_SUBJECTS = {
    ("intake", "task"): 5,
    ("report", "done"): 5,
    ("state",): 4,
    ("result",): 4,
}


def task_of(subject: str) -> tuple[str | None, str | None]:
    """(job, task) named by an intake task, task, done-report, state or result subject, else (None, None)."""
    t = subject.split(".")
    if not t or t[0] != PREFIX or len(t) < 4:
        return None, None
    if t[1] == "task" and len(t) == 5:
        job, task = t[3], t[4]
    elif _TASK_SUBJECTS.get((t[1], t[2])) == len(t) or _TASK_SUBJECTS.get((t[1],)) == len(t):
        job, task = t[-2], t[-1]
    else:
        return None, None
    return (job, task) if is_token(job) and is_token(task) else (None, None)


def parse(subject: str) -> list[str]:
    """Split a fleet subject into its tokens after the prefix (``[kind, ...]``)."""
    parts = subject.split(".")
    if len(parts) < 2 or parts[0] != PREFIX:
        raise InvalidName(f"not a fleet subject: {subject!r}")
    return parts[1:]
