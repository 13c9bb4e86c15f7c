"""Job files: a YAML description of a sweep, for ``fleet submit JOB.yaml``.

::

    name: pi-sweep
    handler: fleet.examples.montecarlo:estimate     # or: command: [python, sim.py, --seed, "{item}"]
    inputs:
      range: [0, 2000]                              # or: list: [...]  or: jsonl: inputs.jsonl
    bundle: 20                                      # items per task
    kwargs: {samples: 20000}
    retries: 2
    timeout: 600
    tenant: default
    queue: default
    priority: 5                                     # 0..9, 9 first
    qos: normal                                     # urgent, normal or backfill

Unknown keys are errors (a typo must not be silently ignored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.core.records import Resources, describe


class JobFileError(ValueError):
    """A job file that cannot be used; the message names the file and the problem."""


class Inputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    list_: list[Any] | None = Field(default=None, alias="list")
    range: tuple[int, int] | tuple[int, int, int] | None = None
    jsonl: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [k for k in ("list_", "range", "jsonl") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("inputs needs exactly one of: list, range, jsonl")
        return self


class JobFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    handler: str | None = None
    command: list[str] | None = None
    inputs: Inputs
    bundle: int = Field(default=1, ge=1, le=100_000)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    tenant: str = "default"
    queue: str = "default"
    priority: int = Field(default=5, ge=0, le=9)
    """0..9 within the tenant: 9 runs first."""
    qos: str | None = None
    """QoS class (urgent, normal, backfill, or one the policy names)."""
    project: str | None = None
    limits: dict[str, float] = {}
    """Rate-limit tokens each task takes at dispatch (``{api-x: 1}``)."""
    retries: int = Field(default=2, ge=0, le=100)
    backoff: float = Field(default=1.0, ge=0)
    timeout: float | None = Field(default=None, gt=0)
    resources: Resources = Resources()
    labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _work(self) -> Self:
        if (self.handler is None) == (self.command is None):
            raise ValueError("give exactly one of handler or command")
        return self


def load(path: str | Path) -> tuple[JobFile, list[Any]]:
    """Parse and validate a job file; return it with its expanded input items."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise JobFileError(f"job file {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise JobFileError(f"job file {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise JobFileError(f"job file {path}: must be a mapping of fields, got {type(raw).__name__}")
    try:
        job = JobFile.model_validate(raw)
    except ValidationError as exc:
        raise JobFileError(
            f"job file {path}: " + describe(exc, "JobFile").removeprefix("JobFile: ")
        ) from None
    return job, items_of(job, path.parent)


def items_of(job: JobFile, base: Path) -> list[Any]:
    inp = job.inputs
    if inp.list_ is not None:
        return list(inp.list_)
    if inp.range is not None:
        return list(range(*inp.range))
    assert inp.jsonl is not None
    src = (base / inp.jsonl) if not Path(inp.jsonl).is_absolute() else Path(inp.jsonl)
    items = []
    try:
        with src.open() as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise JobFileError(f"inputs file {src}: line {n} is not JSON ({exc.msg})") from None
    except OSError as exc:
        raise JobFileError(f"inputs file {src}: cannot read ({exc.strerror})") from None
    return items
