"""SLAI (Bari, Hegde, de Veciana, arXiv 2508.01002): serve decodes at the last moment their TBT
target allows, and spend the rest of each step on prefills, shortest prompt first.

The rule as in the authors' code (github.com/agrimUT/SLAI, SLAIScheduler on Sarathi-Serve):
- After every step, each request that produced a token gets a last schedulable time
  `LST = t_end + TBT_i - delta * mean_step_time`, where TBT_i is the request's own TBT target
  (`tbt_slo_s`) or `tbt_ms`, and delta is `delta_high_kv` instead of `delta` when at least
  `high_kv_frac` of the KV blocks are in use at that moment. A decode is critical when now >= LST.
- Each step fills `token_budget` in this order: (1) critical decodes, earliest LST first;
  (2) prefills already started, in the order they were admitted (the order they first paused);
  (3) new prefills (fresh or preempted requests) by length, shortest first; with `strict_first`
  (on by default: the authors' config sets `user_priority: true`), requests whose TBT target is
  tighter than `tbt_ms` go first; one is admitted only if KV
  blocks for all its tokens are free, and then gets them all at once, as Sarathi-Serve allocates a
  whole prompt on admission; the first that does not fit stops admission (requests preempted in
  this step wait for the next); (4) non-critical decodes, earliest LST first.
- At most `max_decodes` decodes per step and `max_active` requests holding KV.
- A decode that cannot get a block preempts (recompute) the most recently admitted started
  prefill not yet served this step, else it is preempted itself.
Extension, not the paper's (off by default, so `slai` stays faithful): with `max_wait_s` > 0, new
prefills that have waited that long go before all others (in the same order among themselves),
which bounds the starvation of long prompts that shortest-first causes.
Our reading: the length of a new prefill is all of its tokens (the prefix cache is not
consulted), and the budget is fixed: RAD's "optimal tiling" is not in the released code.
Counters: `slai_critical_decodes`, `slai_preempted_prefills`, `slai_preempted_decodes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import Request, Status
from ..scheduler import Scheduler, StepPlan, register


@register("slai")
class SLAI(Scheduler):
    @dataclass
    class Knobs(Scheduler.Knobs):
        tbt_ms: float = 500.0  # TBT target of requests without one (the paper's relaxed tier)
        delta: float = 5.0  # LST slack, in mean step times
        delta_high_kv: float = 10.0  # the slack when KV use is at or above high_kv_frac
        high_kv_frac: float = 0.96  # KV use (fraction of blocks) that switches to delta_high_kv
        token_budget: int = 512  # tokens per step (tau)
        max_decodes: int = 128  # decodes per step
        max_active: int = 128  # requests holding KV at once
        strict_first: bool = True  # order new prefills by (tighter TBT than tbt_ms first, length), as the authors ran it
        max_wait_s: float = 0.0  # EXTENSION, not in the paper: requests waiting this long go first (0: off)

    def tbt(self, request: Request) -> float:
        return request.tbt_slo_s if request.tbt_slo_s is not None else self.knobs.tbt_ms / 1000

    def on_step_end(self, plan: StepPlan, now: float) -> None:
        k = self.knobs
        delta = k.delta_high_kv if self.kv.usage >= k.high_kv_frac else k.delta
        for chunk in plan.chunks:
            r = chunk.request
            if r.status is Status.RUNNING and r.last_token_time == now:  # got a token this step
                r.policy_state["slai_lst"] = now + self.tbt(r) - delta * self.step_time.value

    def schedule(self, now: float) -> StepPlan:
        k = self.knobs
        plan = StepPlan()
        budget = k.token_budget
        decodes = sorted((r for r in self.running if not r.is_prefilling), key=lambda r: r.policy_state["slai_lst"])
        num_critical = sum(now >= r.policy_state["slai_lst"] for r in decodes)
        # Started prefills not yet served this step, oldest first: the pool of preemption victims.
        paused = [r for r in self.running if r.is_prefilling]

        def decode(request: Request) -> bool:
            nonlocal budget
            while (chunk := self.continue_running(request, 1)) is None:
                victim = paused.pop() if paused else request
                self.preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    self.count("slai_preempted_decodes")
                    return False
                self.count("slai_preempted_prefills")
            plan.chunks.append(chunk)
            budget -= 1
            return True

        num_decodes = 0
        for r in decodes[:num_critical]:
            if budget <= 0 or num_decodes >= k.max_decodes:
                break
            if decode(r):
                num_decodes += 1
                self.count("slai_critical_decodes")
        while paused and budget > 0:
            chunk = self.continue_running(paused.pop(0), budget)  # never None: its blocks are reserved
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        strict_s = k.tbt_ms / 1000

        def key(r: Request) -> tuple:
            aged = k.max_wait_s > 0 and now - r.arrival_time >= k.max_wait_s
            return not aged, k.strict_first and self.tbt(r) >= strict_s, r.num_tokens

        for r in sorted((r for r in self.waiting if r not in plan.preempted), key=key):  # victims wait a step
            if budget <= 0 or len(self.running) >= k.max_active:
                break
            chunk = self.admit_reserving(r, now, budget, r.num_tokens)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        for r in decodes[num_critical:]:
            if budget <= 0 or num_decodes >= k.max_decodes:
                break
            num_decodes += decode(r)
        return plan
