"""SAL (Kossmann et al., arXiv 2410.17840): token-aware load balancing.

Our reconstruction (papers.md; the paper's full rule is not public): a worker's load is its
outstanding work in tokens, meaning the prefill left of its waiting and running requests plus the
decode tokens they are still expected to produce. The worker's last report gives that figure
(`outstanding_tokens`). Each request sent since then adds its prompt plus its expected output, by
the schedulers' own rule (scheduling/output_length.py) with the predictor the worker reported
(its mode and per-bucket history; before the first report, an empty history). Each request goes
to the least loaded worker, and ties are broken round-robin so that idle workers share the first
requests.
"""

from __future__ import annotations

from engine.messages import GenerateRequest
from scheduling.output_length import OutputLengths

from ..policy import BalancerPolicy, WorkerLoad, register


def expected_output(request: GenerateRequest, worker: WorkerLoad) -> float:
    """`request`'s expected output length by the predictor `worker` last reported."""
    lengths = worker.stats.output_lengths if worker.stats else OutputLengths()
    s = request.sampling
    return lengths.expected(len(request.prompt_token_ids), s.max_tokens, s.ignore_eos)


@register("sal")
class SAL(BalancerPolicy):
    def __init__(self, knobs=None, seed: int = 0):
        super().__init__(knobs, seed)
        self.next = 0

    def load(self, worker: WorkerLoad) -> float:
        """Tokens the worker still has to compute, counting what was sent since its report."""
        r = worker.stats
        return (r.outstanding_tokens if r else 0.0) + sum(
            len(u.prompt_token_ids) + expected_output(u, worker) for u in worker.unreported)

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        loads = {w.worker_id: self.load(w) for w in workers}
        least = min(loads.values())
        tied = sorted(i for i, load in loads.items() if load == least)
        chosen = next((i for i in tied if i >= self.next), tied[0])
        self.next = chosen + 1
        return chosen
