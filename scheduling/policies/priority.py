"""Priority scheduling, as vLLM's `--scheduling-policy priority` does it: FCFS with every queue
ordered by (priority, arrival time), lower priority values first.

Running requests are served in that order, waiting requests are admitted in that order (the first
that does not fit blocks the rest), and a running request that cannot grow preempts the running
request with the largest (priority, arrival time) not yet served this step: the least urgent, and
of equals the latest to arrive; at worst itself. As in vLLM, a waiting request never preempts a
running one to get in; urgency only decides who goes first and who gives way.
"""

from __future__ import annotations

from ..request import Request
from ..scheduler import StepPlan, register
from .fcfs import FCFS


def urgency(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


@register("priority")
class Priority(FCFS):
    honors_priority = True

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.schedule_running(plan, self.config.max_num_batched_tokens, sorted(self.running, key=urgency))
        if not plan.preempted:
            self.admit_in_order(plan, now, budget, self.waiting_order(now))
        return plan

    def victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=urgency)

    def waiting_order(self, now: float) -> list[Request]:
        return sorted(self.waiting, key=urgency)
