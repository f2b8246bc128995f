"""Static batching as FasterTransformer serves it: a batch is padded to its longest member and runs
until every member has finished.

A batch takes the next requests in arrival order while the padded batch fits in KV: every member
holds blocks for the batch's longest prompt plus its largest `max_tokens` (capped by the context
length), the memory a padded [batch, max_len] KV tensor occupies, for the whole life of the batch.
Nothing is preempted and nobody joins a batch under way. Otherwise it is `sls`.
What is not modelled: the compute spent on padding tokens. The engine runs real tokens only, so
`static` is an optimistic bound on a padded system: it pays padding's memory, not its time.
"""

from __future__ import annotations

from ..request import Request
from ..scheduler import register
from .sls import SLS


@register("static")
class Static(SLS):
    def padded(self, members: list[Request]) -> int:
        longest = max(r.num_prompt_tokens for r in members) + max(r.max_tokens for r in members)
        return min(longest, self.config.max_model_len) - 1

    def batch_fits(self, members: list[Request]) -> bool:
        return len(members) * self.kv.blocks_for(self.padded(members)) <= self.kv.num_blocks

    def reservation(self, request: Request) -> int:
        return self.padded(self.batch)
