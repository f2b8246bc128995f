"""SLS, sequence-level scheduling (the baseline of SCLS): static batching.

Take the next `batch_size` requests in arrival order and run them until every one has finished;
only then take the next batch. Within a batch the mechanics are FCFS's (chunked prefill in the
engine's token budget, a member that cannot grow preempts the newest member by recompute and
rejoins later), so the only difference from FCFS is that nobody joins a batch under way.
The paper's SLS batch size is not public; 16 is our choice ("a small batch size", as the paper
describes SLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from ..kv_cache import KVBlockManager
from ..request import Request
from ..scheduler import SchedulerConfig, StepPlan, register
from .fcfs import FCFS


@register("sls")
class SLS(FCFS):
    @dataclass
    class Knobs(FCFS.Knobs):
        batch_size: int = 16  # requests per static batch

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, knobs: SLS.Knobs | None = None):
        super().__init__(config, kv, knobs)
        self.batch: set[Request] = set()

    def schedule(self, now: float) -> StepPlan:
        if all(r.is_finished for r in self.batch) and self.waiting:
            self.batch = set(islice(self.waiting, self.knobs.batch_size))
            self.count("sls_batches")
        return super().schedule(now)

    def waiting_order(self, now: float) -> list[Request]:
        return [r for r in self.waiting if r in self.batch]
