"""LARRY (Kossmann et al., arXiv 2410.17840): FCFS that stops admitting memory hogs under pressure.

Our reconstruction (papers.md; the paper's full rule is not public):
- A request's memory demand is the KV blocks for its tokens plus its expected remaining output
  (the running mean of finished requests' output lengths, capped by max_tokens; exact for
  ignore_eos). For a fresh request that is `prompt_len + expected_output`; for one preempted
  mid-generation it also counts what it already generated, since that is recomputed too.
- Memory pressure is (blocks in use + expected growth of the running requests) / total blocks,
  where a running request's growth is its demand minus the blocks it holds.
- Running requests are served exactly as in FCFS, preemption by recompute included.
- Admission: requests that waited at least `max_wait_s` go first, in queue order, under FCFS
  rules whatever the pressure, so large requests cannot starve (this aging bound is our
  extension: papers.md; 0 turns it off). Then, while pressure is below `pressure_threshold`, the
  queue head is admitted as in FCFS. At or above it, the waiting request with the smallest demand
  goes next (`smallest_first`), and only if its demand fits in the projected free memory (total -
  in use - expected growth; `fit_check`); otherwise admission stops for this step. The two knobs
  exist for ablations: with `smallest_first` off the queue head is the candidate, with
  `fit_check` off nothing is held back for memory.
- The expected output comes from the shared rule (scheduling/output_length.py), so what LARRY
  knows about lengths is the run's `--output-length`.
- Pressure is re-evaluated after every admission (the admitted request's growth counts from
  then on), so one step can switch from FCFS order to smallest-demand order.
Counters: `larry_deferred` (requests whose FCFS turn was postponed under pressure, once each),
`larry_aged` (admissions that aging pushed through under pressure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..request import Request
from ..scheduler import StepPlan, register
from .fcfs import FCFS


@register("larry")
class Larry(FCFS):
    @dataclass
    class Knobs(FCFS.Knobs):
        pressure_threshold: float = 0.8  # projected KV use at which large requests are held back
        max_wait_s: float = 10.0  # EXTENSION (papers.md): wait after which a request goes first, whatever the pressure; 0: off
        smallest_first: bool = True  # under pressure, admit the smallest demand first (else the queue head)
        fit_check: bool = True  # under pressure, admit only what fits in the projected free memory

    def demand(self, request: Request) -> int:
        """KV blocks the request is expected to hold when it finishes."""
        return self.kv.blocks_for(request.num_tokens + math.ceil(self.expected_remaining_output(request)))

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.schedule_running(plan, self.config.max_num_batched_tokens)
        if plan.preempted:
            return plan
        kv, knobs = self.kv, self.knobs
        growth = sum(max(0, self.demand(r) - len(r.block_ids)) for r in self.running)
        aged = {r for r in self.waiting if knobs.max_wait_s > 0 and now - r.arrival_time >= knobs.max_wait_s}
        queue = sorted(self.waiting, key=lambda r: r not in aged)  # stable: queue order within each
        demand = {r: self.demand(r) for r in queue}
        while queue and budget > 0 and len(self.running) < self.config.max_num_seqs:
            projected = kv.num_used_blocks + growth
            pressure = projected >= knobs.pressure_threshold * kv.num_blocks
            head = queue[0]
            if head in aged or not pressure:
                request = head
            else:
                request = min(queue, key=demand.__getitem__) if knobs.smallest_first else head  # first of equals: queue order
                fits = not knobs.fit_check or demand[request] <= kv.num_blocks - projected
                if (request is not head or not fits) and "larry_deferred" not in head.policy_state:
                    head.policy_state["larry_deferred"] = True
                    self.count("larry_deferred")
                if not fits:
                    break
            chunk = self.admit(request, now, budget)
            if chunk is None:
                break
            if request in aged and pressure:
                self.count("larry_aged")
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
            queue.remove(request)
            growth += max(0, demand[request] - len(request.block_ids))
        return plan
