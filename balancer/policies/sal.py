"""SAL (Kossmann et al., arXiv 2410.17840): token-aware load balancing.

Our reconstruction (papers.md; the paper's full rule is not public): a worker's load is its
outstanding work in tokens, meaning the prefill left of its waiting and running requests plus the
decode tokens they are still expected to produce. The worker's last report gives that figure
(`outstanding_tokens`). Each request sent since then adds its prompt plus its expected output:
`max_tokens` for `ignore_eos` requests, which always run to their limit, and otherwise the
reported running mean of finished output lengths, capped by `max_tokens`. Before a worker's first
report the mean is `prior_output_tokens`. Each request goes to the least loaded worker, and ties
are broken round-robin so that idle workers share the first requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.messages import GenerateRequest

from ..policy import BalancerPolicy, WorkerLoad, register


def expected_output(request: GenerateRequest, mean_output: float) -> float:
    s = request.sampling
    return float(s.max_tokens) if s.ignore_eos else min(float(s.max_tokens), mean_output)


@register("sal")
class SAL(BalancerPolicy):
    @dataclass
    class Knobs(BalancerPolicy.Knobs):
        prior_output_tokens: float = 128.0  # expected output before a worker's first report (the schedulers' prior)

    def __init__(self, knobs=None, seed: int = 0):
        super().__init__(knobs, seed)
        self.next = 0

    def load(self, worker: WorkerLoad) -> float:
        """Tokens the worker still has to compute, counting what was sent since its report."""
        r = worker.stats
        mean_output = r.expected_output_tokens if r else self.knobs.prior_output_tokens
        return (r.outstanding_tokens if r else 0.0) + sum(
            len(u.prompt_token_ids) + expected_output(u, mean_output) for u in worker.unreported)

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        loads = {w.worker_id: self.load(w) for w in workers}
        least = min(loads.values())
        tied = sorted(i for i, load in loads.items() if load == least)
        chosen = next((i for i in tied if i >= self.next), tied[0])
        self.next = chosen + 1
        return chosen
