"""SCLS (Cheng et al., arXiv 2406.13511): slice-level scheduling.

Requests are served in slices of at most S generated tokens. One batch runs at a time; when every
member has produced its S tokens (or finished: early return), the next batch starts. A slice
bounds a batch's memory, so admitting only batches whose slice fits in KV means SCLS never
preempts. Our reconstruction (papers.md; the paper's body is not public):
- Slice: a member runs until it produced `slice_len` more tokens (fewer when max_tokens,
  max_model_len or the size of the whole pool stop it sooner), then goes to the back of the queue
  and keeps its KV blocks. When a later batch needs memory, queued non-members give theirs up,
  most recently queued first, and are recomputed when their turn comes (`scls_recomputes`).
- Memory bound: a batch is admitted only if sum_i blocks(len_i + s_i - 1) fits in the free
  blocks plus what its members already hold, where s_i is member i's slice (papers.md's
  blocks(len_i + S), less the last sampled token, which is computed only in the next slice). Those
  blocks are allocated up front, so no step of a slice can run out of KV.
- Batching (DP): take the first `window` queued requests, sort them by current length, and split
  them into contiguous batches of at most `max_batch` requests whose slices fit in the pool,
  minimizing the total estimated time to give each one slice. The tokens served are the same for
  every split, so this minimizes time per served token. The batches then run in that order
  (shortest first); requests that arrive meanwhile wait for the next plan.
- Time model, fitted online by least squares over the last `fit_window` steps (a prior before
  that): step time = c0 + c1*tokens + c2*sequences + c3*KV tokens read, the simulator's linear model
  (design.md), on the features scheduling/step_cost.py counts for the step log and the simulator.
  From it, T_prefill(N, L) = steps*c0 + (c1+c3)*N*L + c2*N and
  T_decode_step(N, l) = c0 + (c1+c2)*N + c3*N*l: the paper's forms
  p1*N*L + p2*N + p3*L + p4 and d1*N*l + d2*N + d3*l + d4 without the p3/d3 terms, which model
  padding to the longest sequence; our paged engine does not pad. Consequently only the per-step
  cost and the number of prefill steps differ between splits, and the DP packs as few, as full
  batches as memory and max_batch allow.
- Within a batch each step runs decodes first, then prefill chunks, in the engine's token budget.
Counters: `scls_batches`, `scls_slices` (slices ended with the request unfinished), `scls_recomputes`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import islice

from ..kv_cache import KVBlockManager
from ..request import Request, Status
from ..scheduler import Scheduler, SchedulerConfig, StepPlan, register
from ..step_cost import step_features

# Step-time coefficients (s, s/token, s/sequence, s/KV token read) used before enough steps are
# measured; a rough 8B model on an H100 (design.md §5): ~6 ms per step, ~4e-5 s per prefill token
# (16 GFLOP at ~400 TFLOP/s), 131 KB of KV per token read at 3 TB/s.
PRIOR = (6e-3, 4e-5, 1e-5, 4.4e-8)
MIN_SAMPLES = 16  # measured steps before the fit replaces the prior
RIDGE = 1e-6  # pull toward the prior, relative to each feature's scale: keeps collinear data solvable


def fit_linear(samples, prior) -> list[float]:
    """Least squares of y on x over `samples` [(x, y)], ridge-regularized toward `prior`; solved by
    the normal equations on unit-scaled features; coefficients clamped at 0 (time only adds up)."""
    n = len(prior)
    a = [[sum(x[i] * x[j] for x, _ in samples) for j in range(n)] for i in range(n)]
    b = [sum(x[i] * y for x, y in samples) for i in range(n)]
    scale = [math.sqrt(a[i][i]) or 1.0 for i in range(n)]  # unit diagonal: the features span 1..1e5+
    a = [[a[i][j] / (scale[i] * scale[j]) + (RIDGE if i == j else 0.0) for j in range(n)] for i in range(n)]
    b = [b[i] / scale[i] + RIDGE * prior[i] * scale[i] for i in range(n)]
    for col in range(n):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [arc - f * acc for arc, acc in zip(a[r], a[col])]
            b[r] -= f * b[col]
    coef = [0.0] * n
    for i in reversed(range(n)):
        coef[i] = (b[i] - sum(a[i][j] * coef[j] for j in range(i + 1, n))) / a[i][i]
    return [max(0.0, c / scale[i]) for i, c in enumerate(coef)]


@register("scls")
class SCLS(Scheduler):
    @dataclass
    class Knobs(Scheduler.Knobs):
        slice_len: int = 128  # S: tokens a request generates per slice
        window: int = 256  # queued requests the DP batcher splits at once
        max_batch: int = 256  # requests per batch (the paper's value is not public; the engine's seat cap)
        fit_window: int = 1024  # recent steps the time model is fitted on

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, knobs: SCLS.Knobs | None = None):
        super().__init__(config, kv, knobs)
        self.batches: deque[list[Request]] = deque()  # planned by the DP, run in order
        self.samples: deque[tuple[tuple[float, ...], float]] = deque(maxlen=self.knobs.fit_window)
        self.coef = PRIOR

    # ---- time model -----------------------------------------------------------------------------
    def t_prefill(self, num_seqs: int, num_tokens: int) -> float:
        """Prefilling `num_tokens` over `num_seqs` requests, in budget-sized steps."""
        c0, c1, c2, c3 = self.coef
        return math.ceil(num_tokens / self.config.max_num_batched_tokens) * c0 + (c1 + c3) * num_tokens + c2 * num_seqs

    def t_decode_step(self, num_seqs: int, context_tokens: float) -> float:
        """One decode step of `num_seqs` requests holding `context_tokens` in all."""
        c0, c1, c2, c3 = self.coef
        return c0 + (c1 + c2) * num_seqs + c3 * context_tokens

    # ---- batching ---------------------------------------------------------------------------------
    def slice_tokens(self, request: Request) -> int:
        pool_tokens = self.kv.num_blocks * self.kv.block_size
        return max(1, min(self.knobs.slice_len, request.max_tokens - request.num_output_tokens,
                          self.config.max_model_len - request.num_tokens, pool_tokens + 1 - request.num_tokens))

    def slice_blocks(self, request: Request, slice_tokens: int) -> int:
        """KV blocks the request holds at the end of a slice (its last sampled token uncomputed)."""
        return self.kv.blocks_for(request.num_tokens + slice_tokens - 1)

    def plan_batches(self) -> list[list[Request]]:
        if len(self.samples) >= MIN_SAMPLES:
            self.coef = fit_linear(self.samples, PRIOR)
        S = self.knobs.slice_len
        reqs = sorted(islice(self.waiting, self.knobs.window), key=lambda r: r.num_tokens)
        # Prefix sums: slice blocks, prefill tokens, requests that prefill, context tokens.
        blocks, prefill, prefilling, context = [0], [0], [0], [0]
        for r in reqs:
            blocks.append(blocks[-1] + self.slice_blocks(r, self.slice_tokens(r)))
            p = r.num_uncomputed_tokens if r.is_prefilling else 0  # kept KV: nothing to prefill
            prefill.append(prefill[-1] + p)
            prefilling.append(prefilling[-1] + (p > 0))
            context.append(context[-1] + r.num_tokens)
        n = len(reqs)
        best, start = [0.0] + [math.inf] * n, [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, max(0, j - self.knobs.max_batch) - 1, -1):
                if blocks[j] - blocks[i] > self.kv.num_blocks:
                    break  # a singleton always fits: slice_tokens caps by the pool
                m = j - i
                t = (best[i] + self.t_prefill(prefilling[j] - prefilling[i], prefill[j] - prefill[i])
                     + S * self.t_decode_step(m, context[j] - context[i] + m * S / 2))
                if t < best[j]:
                    best[j], start[j] = t, i
        batches = []
        while n:
            batches.append(reqs[start[n]:n])
            n = start[n]
        return batches[::-1]

    def admit_batch(self, members: list[Request], now: float) -> None:
        slices = {r: self.slice_tokens(r) for r in members}

        def shortfall() -> int:
            need = sum(self.slice_blocks(r, s) - len(r.block_ids) for r, s in slices.items())
            return need - self.kv.num_free_blocks

        holders = [r for r in self.waiting if r.block_ids and r not in slices]
        while shortfall() > 0 and holders:
            self.kv.free_request(holders.pop())
            self.count("scls_recomputes")
        while shortfall() > 0:  # prefix blocks shared with the freed ones were counted but stay held
            del slices[members.pop()]
        for r, s in slices.items():
            # admit() moves it to running and claims its cached prefix; then reserve the whole slice.
            self.admit(r, now, r.num_uncomputed_tokens)
            self.kv.allocate(r, r.num_uncomputed_tokens + s - 1)
            r.policy_state["scls_until"] = r.num_output_tokens + s
        if slices:
            self.count("scls_batches")

    # ---- the interface ----------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        if not self.running and self.waiting:
            members: list[Request] = []
            while not members:  # skip planned batches whose requests were all aborted
                if not self.batches:
                    self.batches.extend(self.plan_batches())
                members = [r for r in self.batches.popleft() if r.status is Status.WAITING]
            self.admit_batch(members, now)
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for r in sorted(self.running, key=lambda r: r.is_prefilling):  # decodes first: a token each
            if budget <= 0:
                break
            chunk = self.continue_running(r, budget)  # never None: the slice's blocks are reserved
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
        return plan

    def update(self, plan: StepPlan, sampled: list[int | None], now: float, step_seconds: float) -> list[Request]:
        self.samples.append((step_features(plan).linear_terms(), step_seconds))
        return super().update(plan, sampled, now, step_seconds)

    def on_step_end(self, plan: StepPlan, now: float) -> None:
        for chunk in plan.chunks:
            r = chunk.request
            if r.status is Status.RUNNING and r.num_output_tokens >= r.policy_state["scls_until"]:
                self.running.remove(r)  # slice done: back of the queue, KV kept while memory allows
                r.status = Status.WAITING
                self.waiting.append(r)
                self.count("scls_slices")
