"""Messages on the shared-memory queues between server, balancer and workers (msgspec msgpack).

Also the offline API's `SamplingParams`: the same struct travels on the wire, so what a user sets
offline and what the server sends a worker cannot drift apart.
"""

from __future__ import annotations

import msgspec

from scheduling.scheduler import SchedulerStats


class StructuredOutputs(msgspec.Struct, frozen=True, omit_defaults=True):
    """One constraint on a request's output; exactly one field is set."""
    json: str | None = None          # a JSON schema, as JSON text
    json_object: bool = False        # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None       # EBNF / Lark grammar text
    start_after: list[int] | None = None  # token ids (e.g. the end of a reasoning block) after which the constraint starts


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[int, float] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of range."""
        def bad(name: str, why: str):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if self.max_tokens < 0:
            bad("max_tokens", "must be >= 0")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            bad("min_tokens", "must be between 0 and max_tokens")
        if not self.temperature >= 0.0:  # also rejects NaN
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k < 2**63:  # it becomes an int64 tensor
            bad("top_k", "must be -1 (off), 0 (off) or positive (and fit in 64 bits)")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 100.0:
            bad("repetition_penalty", "must be in (0, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                bad(name, "must be between 0 and 20")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "must fit in 64 bits")
        if self.logit_bias and not all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            bad("logit_bias", "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class SLO(msgspec.Struct, frozen=True, omit_defaults=True):
    ttft_ms: float | None = None
    tbt_ms: float | None = None


class GenerateRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0
    slo: SLO = SLO()


class Abort(msgspec.Struct, tag=True):
    request_id: str
    worker_id: int = -1  # the owner, as the balancer reported it


class Routed(msgspec.Struct, tag=True):
    """Balancer to server: where a request went (so aborts and worker failures find it)."""
    request_id: str
    worker_id: int


class RouteFailed(msgspec.Struct, tag=True):
    request_id: str
    error: str


class WorkerDown(msgspec.Struct, tag=True):
    """Server to balancer: stop routing to this worker; the balancer answers with the same message
    once nothing more will be sent to it."""
    worker_id: int


class WorkerUp(msgspec.Struct, tag=True):
    worker_id: int
    incarnation: int


class Shutdown(msgspec.Struct, tag=True):
    pass


class TopLogprobs(msgspec.Struct, array_like=True):
    """Logprob of the chosen token, then the top alternatives (ids and logprobs, best first)."""
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class RequestTimings(msgspec.Struct, array_like=True, omit_defaults=True):
    queue_s: float = 0.0  # arrival to first scheduled
    num_preemptions: int = 0


class TokenOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[TopLogprobs | None] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    num_cached_tokens: int = 0
    timings: RequestTimings | None = None
    error: str | None = None
    status: int = 0  # with `error`: the HTTP status it maps to (400 refused input, 503 worker lost)


class StepOutputs(msgspec.Struct, tag=True):
    worker_id: int
    outputs: list[TokenOutput]


class LoadReport(msgspec.Struct, tag=True):
    worker_id: int
    stats: SchedulerStats
    requests_in: int = 0  # requests this worker has received in total (balancer reconciles on it)
    counters: dict[str, int] = {}  # the policy's decision counters
    time: float = 0.0
    incarnation: int = 0  # which start of this worker sent it; stale reports are dropped


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    """Worker to server: the model is loaded (or, with `error`, could not be: then the engine's fields are unset)."""
    worker_id: int
    incarnation: int
    model: str
    num_kv_blocks: int = 0
    block_size: int = 0
    max_model_len: int = 0
    device: str = ""
    attention_backend: str = ""
    error: str | None = None  # the worker could not start: why
    node: str = "local"  # where it runs: "local" (this machine), or its Ray node's id


class WorkerFailed(msgspec.Struct, tag=True):
    """A worker hit an error it cannot recover from; the server fails its requests."""
    worker_id: int
    error: str


# What travels on each queue.
ToBalancer = GenerateRequest | Abort | WorkerDown | WorkerUp | Shutdown
FromBalancer = Routed | RouteFailed | WorkerDown | LoadReport
ToWorker = GenerateRequest | Abort | Shutdown
FromWorker = StepOutputs | WorkerReady | WorkerFailed
