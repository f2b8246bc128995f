"""What the scheduler knows about one request: its tokens, its limits, and where it stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0  # lower is more urgent, as in vLLM
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # Every prompt position must be computed, none taken from the prefix cache: prompt logprobs
    # are scored from the logits of the positions the step computes.
    skip_prefix_cache: bool = False
    # Opaque to every scheduler; the model runner reads it (sampling parameters).
    payload: Any = None

    # Progress. `token_ids` is prompt + output so far: after a preemption the whole of it is
    # recomputed as one prompt, which is why it lives in one list.
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_digests: list[bytes] = field(default_factory=list)  # digests of full blocks, computed lazily
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted

    # Accounting that reports and policies read.
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    policy_state: dict[str, Any] = field(default_factory=dict)  # per-policy scratch space

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until the request has its first token and only that token awaits the model
        (a prompt, or a recompute of prompt and output after preemption)."""
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
