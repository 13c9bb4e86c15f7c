"""Blocking wrapper over :class:`FleetClient` for code that is not async.

::

    with SyncFleetClient("nats://127.0.0.1:4222") as fleet:
        job = fleet.submit_job("fleet.examples.montecarlo:estimate", items=range(1000), bundle=10)
        print(fleet.wait_job(job, timeout=600).counts)

The async client runs on an event loop in a background thread (an anyio blocking portal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from clients.sdk.client import FleetClient
from fleet.core.records import DoneReport, JobRecord

T = TypeVar("T")


class SyncFleetClient:
    def __init__(self, url: str) -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        try:
            self._client: FleetClient = self._portal.call(FleetClient.connect, url)
        except BaseException:
            self._stack.close()
            raise

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return await fn(*args, **kwargs)

        return self._portal.call(call)

    def submit(self, handler: str | None = None, *args: Any, **options: Any) -> tuple[str, str]:
        return self._call(self._client.submit, handler, *args, **options)

    def submit_job(self, handler: str | None = None, **options: Any) -> str:
        return self._call(self._client.submit_job, handler, **options)

    def result(self, job_id: str, task_id: str, timeout: float | None = None) -> Any:
        return self._call(self._client.result, job_id, task_id, timeout)

    def job(self, job_id: str) -> JobRecord | None:
        return self._call(self._client.job, job_id)

    def wait_job(self, job_id: str, timeout: float | None = None) -> JobRecord:
        return self._call(self._client.wait_job, job_id, timeout)

    def results(self, job_id: str) -> list[tuple[DoneReport, Any]]:
        async def collect() -> list[tuple[DoneReport, Any]]:
            return [pair async for pair in self._client.results(job_id)]

        return self._portal.call(collect)

    def cancel(self, job_id: str, task_id: str | None = None) -> None:
        self._call(self._client.cancel, job_id, task_id)

    def close(self) -> None:
        try:
            self._portal.call(self._client.close)
        finally:
            self._stack.close()

    def __enter__(self) -> SyncFleetClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["SyncFleetClient"]
