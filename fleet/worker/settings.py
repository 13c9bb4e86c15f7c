"""Worker settings (``FLEET_WORKER_*``); ``fleet worker`` passes every flag explicitly."""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.provision import DEFAULT_LEASE_S
from fleet.core.records import Resources


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_WORKER_")

    queue: str = "default"
    concurrency: int = Field(default=4, ge=1)
    executor: str = "thread"
    heartbeat_s: float = Field(default=1.0, gt=0, le=3600)
    """How often a heartbeat (a request the scheduler answers with fences) is sent."""
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    """AckWait of the queue consumer if this worker creates it (an existing consumer's wins). Leases
    are renewed every ``min(lease / 4, 15)`` seconds; one not confirmed for ``0.8 x lease`` is given
    up (the worker fences itself)."""
    grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: how long running tasks may finish before they are reported ``preempted``."""
    fetch_timeout_s: float = Field(default=2.0, gt=0)
    worker_id: str = ""
    allow: list[str] = []
    """Handler module prefixes this worker runs (``--allow``); empty: anything but the standard library."""
    cpus: float = Field(default_factory=lambda: float(os.cpu_count() or 1), gt=0)
    gpus: int = Field(default=0, ge=0)
    memory_mb: int = Field(default_factory=lambda: _memory_mb(), ge=0)
    labels: dict[str, str] = {}
    """What this worker has, for tasks that ask for resources (``--cpus --gpus --memory --label k=v``)."""

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, memory_mb=self.memory_mb, labels=self.labels)


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError):
        return 0


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
