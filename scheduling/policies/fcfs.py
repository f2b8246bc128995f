"""FCFS: vLLM V1-style continuous batching with chunked prefill.

One token budget per step. Running requests go first, in admission order (a decode token each, or
their next prefill chunk); then waiting requests in arrival order, the last one chunked to fit. A
waiting request that cannot get KV blocks for its chunk blocks the queue. A running request that
cannot grow preempts the most recently admitted running request (recompute); a step that preempted
admits nothing new.
"""

from __future__ import annotations

from ..request import Request, Status
from ..scheduler import Chunk, Scheduler, StepPlan, register


@register("fcfs")
class FCFS(Scheduler):
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.schedule_running(plan, budget=self.config.max_num_batched_tokens)
        if not plan.preempted:
            self.admit_in_order(plan, now, budget, self.waiting_order(now))
        return plan

    def schedule_running(self, plan: StepPlan, budget: int, order: list[Request] | None = None) -> int:
        """Serve running requests in `order` (admission order by default), preempting the newest
        running request whenever one cannot grow. Returns the budget left."""
        for request in list(self.running if order is None else order):
            if budget <= 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            chunk = self.continue_running(request, budget)
            while chunk is None:
                # A running request not yet served this step (`order` may differ from admission
                # order); at worst the request itself.
                served = {c.request for c in plan.chunks}
                victim = self.victim([r for r in self.running if r not in served])
                self.preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
                chunk = self.continue_running(request, budget)
            if chunk is not None:
                plan.chunks.append(chunk)
                budget -= chunk.num_tokens
        return budget

    def victim(self, candidates: list[Request]) -> Request:
        """The running request to preempt, of `candidates` (in admission order): the newest."""
        return candidates[-1]

    def waiting_order(self, now: float) -> list[Request]:
        return list(self.waiting)

    def admit_in_order(self, plan: StepPlan, now: float, budget: int, order: list[Request]) -> int:
        """Admit waiting requests in `order` until the budget, the seat cap or KV runs out; the
        first that does not fit blocks the rest."""
        for request in order:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            chunk: Chunk | None = self.admit(request, now, budget)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        return budget
