"""ILS, iteration-level scheduling as the SCLS paper's baseline (Orca; TensorRT-LLM's
`GUARANTEED_NO_EVICT`): continuous batching that never runs out of memory because it reserves
each request's worst case up front.

Per the SCLS abstract, ILS "limits the number of parallel-processing requests to avoid OOM": a
waiting request is admitted, in arrival order, only if KV blocks for its prompt plus `max_tokens`
(capped by the context length; less the last sampled token, which is never computed) are free,
and it holds all of them until it finishes. Nothing is ever preempted. Steps are FCFS's: running
requests first (a decode each, or their next prefill chunk), then admissions within the token
budget and the seat cap; the first request that does not fit blocks the queue.
How much it admits depends on what clients declare as `max_tokens` (`--output-length`): told the
true lengths (`oracle`) it reserves exactly; given limits, it reserves the worst case.
"""

from __future__ import annotations

from ..request import Request
from ..scheduler import StepPlan, register
from .fcfs import FCFS


@register("ils")
class ILS(FCFS):
    def reservation(self, request: Request) -> int:
        """Tokens of KV the request holds from admission to its end."""
        return min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len) - 1

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.schedule_running(plan, self.config.max_num_batched_tokens)  # never short of KV
        for request in self.waiting_order(now):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            reserve = max(self.reservation(request), request.num_tokens)
            chunk = self.admit_reserving(request, now, budget, reserve)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        return plan
