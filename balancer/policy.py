"""The one interface every balancer policy implements, and the load view it decides on.

Each worker's load is its latest report plus the balancer's exact record of what it sent that
worker since then: a report says how many requests the worker had received in total, so the
requests sent after that count are known one by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from engine.messages import GenerateRequest, LoadReport
from scheduling import SchedulerStats
from scheduling.registry import Knobs, Registry


@dataclass
class WorkerLoad:
    worker_id: int
    alive: bool = True
    report: LoadReport | None = None
    sent: int = 0  # requests routed here, in total
    unreported: list[GenerateRequest] = field(default_factory=list)  # sent after `report` was made

    @property
    def stats(self) -> SchedulerStats | None:
        """The worker's load as of its latest report (None before the first)."""
        return self.report.stats if self.report else None

    @property
    def in_flight(self) -> int:
        """Requests running or waiting at the worker, counting those not yet reported."""
        r = self.stats
        return (r.num_running + r.num_waiting if r else 0) + len(self.unreported)

    def record_sent(self, request: GenerateRequest) -> None:
        self.sent += 1
        self.unreported.append(request)

    def record_report(self, report: LoadReport) -> None:
        self.report = report
        # The worker has seen `requests_in` of ours; the rest are still in flight to it.
        self.unreported = self.unreported[len(self.unreported) - (self.sent - report.requests_in):] \
            if self.sent > report.requests_in else []

    def reset(self) -> None:
        """A restarted worker starts from nothing."""
        self.report, self.sent, self.unreported = None, 0, []


BALANCERS = Registry("balancer")
register = BALANCERS.register


class BalancerPolicy:
    name: ClassVar[str] = ""
    Knobs: ClassVar[type] = Knobs

    def __init__(self, knobs: Knobs | None = None, seed: int = 0):
        self.knobs = knobs if knobs is not None else self.Knobs()
        self.rng = random.Random(seed)

    def choose(self, request: GenerateRequest, workers: list[WorkerLoad]) -> int:
        """The worker id for `request`; `workers` holds only live workers, never empty."""
        raise NotImplementedError

    def on_report(self, report: LoadReport) -> None:
        """Hook for policies that learn from reports (fitted time models)."""
