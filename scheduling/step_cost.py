"""What a step costs, counted from its plan: the features the step-time model charges.

Written once and used by every reader of step costs: the engine's step log, the simulator's step
model (loadgen/step_model.py) and SCLS's online time model, so the three never count a step
differently. Pure Python: the plan is read before the scheduler's update changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler import StepPlan


@dataclass(frozen=True, slots=True)
class StepFeatures:
    batched_tokens: int  # tokens run through the model: every matmul's M dimension
    num_seqs: int  # chunks (one per scheduled sequence)
    prefill_tokens: int  # tokens of chunks that are prefills (prompt or recompute)
    decode_seqs: int  # chunks that are one decode token
    kv_tokens_read: int  # context each chunk's attention reads, summed: start + num_tokens
    attention_pairs: int  # query-key pairs attention computes: a chunk of n at start s has n*s + n(n+1)/2

    @classmethod
    def of_chunks(cls, chunks) -> StepFeatures:
        """From (start, num_tokens, is_decode) triples."""
        if not chunks:
            return cls(0, 0, 0, 0, 0, 0)
        starts, sizes, decodes = zip(*chunks)
        tokens = sum(sizes)
        decode = sum(decodes)  # a decode is one token
        pairs = sum(map(int.__mul__, sizes, starts)) + sum(n * (n + 1) // 2 for n in sizes)
        return cls(tokens, len(sizes), tokens - decode, decode, sum(starts) + tokens, pairs)

    def linear_terms(self) -> tuple[float, float, float, float]:
        """(1, tokens, sequences, KV tokens read): the terms of the linear step model
        c0 + c1*tokens + c2*sequences + c3*KV read (design.md), which SCLS fits online."""
        return 1.0, self.batched_tokens, self.num_seqs, self.kv_tokens_read


def chunk_shapes(plan: StepPlan) -> list[tuple[int, int, bool]]:
    """(start, num_tokens, is_decode) of each chunk; before update(), which moves `start` on."""
    return [(c.start, c.num_tokens, not c.request.is_prefilling) for c in plan.chunks]


def step_features(plan: StepPlan) -> StepFeatures:
    return StepFeatures.of_chunks(chunk_shapes(plan))
