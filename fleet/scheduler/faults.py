"""Fault injection at the scheduler's effect points, for the fault suite (``FLEET_FAULTS``).

``FLEET_FAULTS="dispatch=0.2,state=0.2"`` makes each named effect point fail with that probability:
half the time *before* the effect is carried out (nothing stored), half the time *after* (stored,
but the acknowledgement "lost"). Either way the scheduler must retry and end every task correctly.
Points: dispatch, result, dlq, state, job, delete, purge, archive. Unset means no faults.
"""

from __future__ import annotations

import os
import random

from broker.publisher import PublishError

ENV = "FLEET_FAULTS"
POINTS = ("dispatch", "result", "dlq", "state", "job", "delete", "purge", "archive")


class Faults:
    def __init__(self, spec: str = "", seed: int | None = None) -> None:
        self.p: dict[str, float] = {}
        for part in filter(None, (x.strip() for x in spec.split(","))):
            point, _, prob = part.partition("=")
            if point not in POINTS:
                raise ValueError(f"{ENV}: unknown fault point {point!r} (known: {', '.join(POINTS)})")
            self.p[point] = float(prob or 1.0)
        self.rand = random.Random(seed)
        self.injected = 0

    @classmethod
    def from_env(cls) -> Faults:
        seed = os.environ.get(ENV + "_SEED")
        return cls(os.environ.get(ENV, ""), int(seed) if seed else None)

    def _hit(self, point: str, when: str) -> None:
        p = self.p.get(point, 0.0)
        if p and self.rand.random() < p / 2:
            self.injected += 1
            raise PublishError(f"injected fault {when} {point}", transient=True)

    def before(self, point: str) -> None:
        self._hit(point, "before")

    def after(self, point: str) -> None:
        self._hit(point, "after")
