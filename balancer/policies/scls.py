"""SCLS offloading (Cheng et al., arXiv 2406.13511): each request goes to the worker where it is
estimated to finish first.

The paper's max-min offloader puts each batch on the instance with the smallest estimated finish
time, with times from its fitted step-time model. For one arriving request, max-min reduces to
choosing the worker that minimizes that request's finish time. Our reconstruction (papers.md; the
paper's body is not public) prices a worker's state, as of its last report plus the requests sent
since, with the step model `t = c0 + c1*tokens + c2*sequences + c3*KV tokens read`:
- Prefill: the request waits for the prompts queued ahead of it and then computes its own, at
  `c1` per token plus a step's fixed cost `c0` for every `step_tokens` tokens.
- Decode: one token per step. Each step also carries the worker's other requests that still have
  decode tokens left: their reported outstanding decode, spread over the request's own output,
  gives the mean batch `b`. Such a step costs `c0 + (c1 + c2)*b + c3*b*L`, where `L` is the mean
  context of the worker's requests. With more requests than `step_seqs` seats, a request is
  served only that share of the steps.
The report's `mean_step_time` is a mean over the worker's whole life, which cannot price the batch
the worker holds now; so the model prices it from the reported token counts. The model's
coefficients are knobs, defaulting to the same H100 prior the SCLS scheduler starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.messages import GenerateRequest
from scheduling.policies.scls import PRIOR

from ..policy import BalancerPolicy, WorkerLoad, register
from .sal import expected_output


@register("scls")
class SCLSOffload(BalancerPolicy):
    @dataclass
    class Knobs(BalancerPolicy.Knobs):
        model_c0: float = PRIOR[0]  # seconds per step
        model_c1: float = PRIOR[1]  # seconds per batched token
        model_c2: float = PRIOR[2]  # seconds per sequence in a step
        model_c3: float = PRIOR[3]  # seconds per KV token read
        step_tokens: int = 2048  # the workers' token budget per step
        step_seqs: int = 256  # the workers' cap on running requests

    def finish_time(self, request: GenerateRequest, worker: WorkerLoad) -> float:
        """Estimated seconds until `request` would finish on `worker`."""
        k, r, sent = self.knobs, worker.stats, worker.unreported
        others = (r.num_running + r.num_waiting if r else 0) + len(sent)
        prefill = ((r.waiting_prefill_tokens if r else 0) + sum(len(u.prompt_token_ids) for u in sent)
                   + len(request.prompt_token_ids))
        # Outstanding tokens beyond the queued prompts are (mostly) decode still to come.
        decode = ((max(0.0, r.outstanding_tokens - r.waiting_prefill_tokens) if r else 0.0)
                  + sum(expected_output(u, worker) for u in sent))
        context = (r.running_tokens if r else 0) + prefill
        output = max(1.0, expected_output(request, worker))
        batch = min(1.0 + min(decode, others * output) / output, k.step_seqs)
        share = max(1.0, (others + 1) / k.step_seqs)  # more requests than seats: each holds one part of the time
        step = k.model_c0 + (k.model_c1 + k.model_c2) * batch + k.model_c3 * batch * context / (others + 1)
        prefill_time = prefill * (k.model_c1 + k.model_c0 / k.step_tokens)
        return prefill_time + output * share * step

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        return min(workers, key=lambda w: (self.finish_time(request, w), w.worker_id)).worker_id
