"""SLS, sequence-level scheduling (the baseline of SCLS): static batching in arrival order.

Take the next batch of requests in arrival order and run it until every member has finished; only
then take the next. The batch size is chosen as the SCLS paper describes SLS choosing it: "to
avoid out-of-memory errors, SLS batches requests using a small batch size", i.e. no larger than
what memory holds if every member generates its maximal length. So a batch takes the next
requests in arrival order while the sum of their worst cases (prompt plus `max_tokens`, as `ils`
reserves) fits in the KV pool, up to the engine's seat cap; each member holds its worst case from
admission, and nothing is ever preempted. Within a batch, steps are FCFS's (chunked prefill in the
token budget); finished members leave, and nobody joins until the batch is done. The padding of
a static batch is `static`'s business; SLS here pays only for the wait.
"""

from __future__ import annotations

from ..kv_cache import KVBlockManager
from ..request import Request
from ..scheduler import SchedulerConfig, StepPlan, register
from .ils import ILS


@register("sls")
class SLS(ILS):
    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, knobs=None):
        super().__init__(config, kv, knobs)
        self.batch: list[Request] = []

    def batch_fits(self, members: list[Request]) -> bool:
        return sum(self.kv.blocks_for(self.reservation(r)) for r in members) <= self.kv.num_blocks

    def schedule(self, now: float) -> StepPlan:
        if all(r.is_finished for r in self.batch) and self.waiting:
            self.batch = [self.waiting[0]]  # one request always fits: prompts never outgrow the pool
            for r in list(self.waiting)[1:self.config.max_num_seqs]:
                if not self.batch_fits(self.batch + [r]):
                    break
                self.batch.append(r)
            self.count(f"{self.name}_batches")
        return super().schedule(now)

    def waiting_order(self, now: float) -> list[Request]:
        members = set(self.batch)
        return [r for r in self.waiting if r in members]
