"""Sarathi-Serve as the SLAI paper runs it (its baseline): stall-free chunked prefill.

Each step fills a token budget (512) in this order: every running decode, then the next chunks of
prefills already under way, then new prefills in arrival order, the last one chunked to fit; at
most 128 requests run at once. A new request is admitted only when KV blocks for its whole prompt
are free beyond a watermark of 1% of the pool, and it takes them all at once: the rule of the
Sarathi-Serve block manager the SLAI authors ran (`can_allocate` with `watermark=0.01`); the first
that does not fit blocks the queue. Everything else is FCFS: a request that cannot grow preempts
the newest running request not yet served this step (recompute), and a step that preempted admits
nothing new. The budget and the cap are this policy's knobs and replace the engine-wide
`max_num_batched_tokens` / `max_num_seqs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..kv_cache import KVBlockManager
from ..scheduler import SchedulerConfig, StepPlan, register
from .fcfs import FCFS


@register("sarathi")
class Sarathi(FCFS):
    @dataclass
    class Knobs(FCFS.Knobs):
        token_budget: int = 512  # tokens per step (prefill chunks and decodes together)
        max_running: int = 128  # requests admitted at once
        watermark: float = 0.01  # fraction of KV blocks an admission must leave free

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, knobs: Sarathi.Knobs | None = None):
        super().__init__(config, kv, knobs)
        self.config = dataclasses.replace(config, max_num_batched_tokens=self.knobs.token_budget,
                                          max_num_seqs=self.knobs.max_running)

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        decodes_first = sorted(self.running, key=lambda r: r.is_prefilling)  # stable: admission order within each
        budget = self.schedule_running(plan, self.config.max_num_batched_tokens, decodes_first)
        if plan.preempted:
            return plan
        watermark = int(self.knobs.watermark * self.kv.num_blocks)
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            chunk = self.admit_reserving(request, now, budget, request.num_tokens, watermark)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        return plan
