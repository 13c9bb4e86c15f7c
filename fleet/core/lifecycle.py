"""The ledger's lifecycle side: archiving and pruning finished jobs, and rebuilding after a
restart from the records (``fleet.scheduler.recovery`` feeds it). Pure."""

from __future__ import annotations

from collections.abc import Iterable

from fleet.core.dispatch import Dispatching
from fleet.core.effects import Archive, Effect
from fleet.core.failures import FailureClass
from fleet.core.records import JobRecord, TaskRecord
from fleet.core.states import TaskState
from fleet.core.tasks import TaskEntry


class Lifecycle(Dispatching):
    """A base class of ``Ledger`` (which provides the state these methods share)."""

    _by_worker: dict[str, set[tuple[str, str]]]
    _dirty_jobs: set[str]
    _dirty_tasks: dict[tuple[str, str], TaskEntry]

    def _arm(self, entry: TaskEntry, at: float) -> None:
        raise NotImplementedError

    # -- finished jobs --------------------------------------------------------------------------------
    def archive_due(self, now: float, retention_s: float, settle_s: float = 300.0) -> list[Effect]:
        out: list[Effect] = []
        for job in self.jobs.values():
            if job.settle(now, settle_s):
                self._dirty_jobs.add(job.job_id)
            if job.finished_at is not None and not job.archiving and now - job.finished_at >= retention_s:
                job.archiving = True
                out.append(Archive(job.job_id, tuple(sorted(job.blobs))))
        return out

    def archived(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            for entry in job.tasks.values():
                if entry.worker:
                    self._by_worker.get(entry.worker, set()).discard(entry.key)
        self._dirty_jobs.discard(job_id)

    def prune(self, now: float, keep_s: float) -> int:
        """Drop task entries of jobs finished more than ``keep_s`` ago (their records stay)."""
        n = 0
        for job in self.jobs.values():
            if job.finished_at is not None and not job.pruned and now - job.finished_at > keep_s:
                for entry in job.tasks.values():
                    self._dirty_tasks.pop(entry.key, None)
                job.tasks, job.pruned = {}, True
                n += 1
        return n

    # -- recovery ----------------------------------------------------------------------------------
    def restore_job(self, record: JobRecord) -> None:
        self.job(record.job_id, record.created_at).apply_record(record)
        self._dirty_jobs.discard(record.job_id)

    def restore_task(self, record: TaskRecord) -> None:
        job = self.job(record.job_id, record.at)
        entry = TaskEntry.from_record(record)
        old = job.tasks.get(record.task_id)
        if old is not None:
            job.count(old.state, None)
        else:
            job.submitted += 1
        job.tasks[record.task_id] = entry
        job.count(None, entry.state)
        if entry.state in (TaskState.FAILED, TaskState.DEAD):
            job.count_failure(None, entry.failure or FailureClass.INVALID)
        job.blobs.update(entry.blobs)

    def reload(self, job_id: str, records: Iterable[TaskRecord], *, keep_pruned: bool = False) -> None:
        """Entries of a pruned job back in memory, without counting them again."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        for r in records:
            job.tasks.setdefault(r.task_id, TaskEntry.from_record(r))
        job.pruned = keep_pruned and job.pruned

    def after_restore(self, now: float) -> list[Effect]:
        """Finish recovery: count what each tenant holds, index holders, re-arm timers, put
        waiting tasks back in the room, and re-check every job's completion (a crash after a
        job's last task must not leave it open)."""
        for job in self.jobs.values():
            for entry in job.tasks.values():
                if entry.state is not None:
                    self._account(entry, None, entry.state, job, now)
                if entry.state == TaskState.RUNNING and entry.worker:
                    self._by_worker.setdefault(entry.worker, set()).add(entry.key)
                elif entry.state in (TaskState.RETRYING, TaskState.QUEUED) and entry.not_before is not None:
                    self._arm(entry, entry.not_before)
                elif entry.state == TaskState.QUEUED:
                    self._enqueue(entry, now)
            if job.check_finished(now):
                self._dirty_jobs.add(job.job_id)
            if job.finished_at is not None:
                job.tasks, job.pruned = {}, True
        return []
