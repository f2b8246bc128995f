"""The one interface every engine-level scheduling policy implements, and the shared mechanics.

A policy decides *who* runs each step; the base class owns *how* state changes: admitting,
preempting by recompute, finishing, freeing KV. The scheduler never reads a clock and never touches
a tensor: `now` and measured step times are passed in, so the simulator drives the same objects.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from .kv_cache import KVBlockManager
from .output_length import OutputLengths
from .registry import Knobs, Registry
from .request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    eos_token_ids: frozenset[int] = frozenset()
    output_length: str = "history"  # what length predictions may know: output_length.MODES


@dataclass
class Chunk:
    """`num_tokens` tokens of `request`, starting at position `start`, run in this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last logits are sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def put_decodes_first(self) -> None:
        """Chunks of one new token go first, each group keeping the policy's order: the model runner
        hands them to the attention backends as one decode batch."""
        if any(a.num_tokens != 1 and b.num_tokens == 1 for a, b in zip(self.chunks, self.chunks[1:])):
            self.chunks.sort(key=lambda c: c.num_tokens != 1)


@dataclass
class SchedulerStats:
    """A worker's load as its scheduler sees it; workers send it to the balancer in each LoadReport.
    The defaults describe an idle worker."""
    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0
    running_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    mean_step_time: float = 0.0
    num_preemptions: int = 0
    num_steps: int = 0
    expected_output_tokens: float = 0.0  # mean output of finished requests
    output_lengths: OutputLengths = field(default_factory=OutputLengths)  # the worker's length predictor
    outstanding_tokens: float = 0.0  # prefill left plus expected decode left, in tokens
    busy_seconds: float = 0.0  # total time spent in steps: with processed_tokens, the load-imbalance figures
    processed_tokens: int = 0  # prompt and output tokens run through the model, recomputation included


class RunningMean:
    def __init__(self, initial: float = 0.0):
        self.value, self.count = initial, 0

    def add(self, x: float) -> None:
        self.count += 1
        self.value += (x - self.value) / self.count


SCHEDULERS = Registry("scheduler")
register = SCHEDULERS.register


class Scheduler:
    name: ClassVar[str] = ""
    Knobs: ClassVar[type] = Knobs
    honors_priority: ClassVar[bool] = False  # a policy that orders by request priority sets this

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager, knobs: Knobs | None = None):
        self.config = config
        self.kv = kv
        self.knobs = knobs if knobs is not None else self.Knobs()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self.step_time = RunningMean()
        self.output_lengths = OutputLengths(config.output_length)
        self.num_preemptions = 0
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.processed_tokens = 0
        self.counters: dict[str, int] = {}  # policy decision counters, exported on /metrics

    # ---- the interface ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self._finish(request, "abort", None)
        return request

    def __init_subclass__(cls, **kwargs):
        # Every policy's plan comes out decodes first, whatever order the policy built it in: the
        # guarantee lives here once instead of in each policy (or in the model runner, re-sorting).
        super().__init_subclass__(**kwargs)
        if "schedule" in cls.__dict__:
            policy_schedule = cls.__dict__["schedule"]

            @functools.wraps(policy_schedule)
            def schedule(self, now: float) -> StepPlan:
                plan = policy_schedule(self, now)
                plan.put_decodes_first()
                return plan
            cls.schedule = schedule

    def schedule(self, now: float) -> StepPlan:
        """This step's plan; its chunks come decodes first (one new token each), then the rest."""
        raise NotImplementedError

    def update(self, plan: StepPlan, sampled: list[int | None], now: float,
               step_seconds: float) -> list[Request]:
        """Apply a step's results. `sampled[i]` is the token sampled for `plan.chunks[i]` (None
        where the chunk did not sample). Returns the requests that got a token or finished."""
        self.num_steps += 1
        self.step_time.add(step_seconds)
        self.busy_seconds += step_seconds
        self.processed_tokens += plan.num_batched_tokens
        touched = []
        for chunk, token in zip(plan.chunks, sampled):
            request = chunk.request
            if request.is_finished:  # aborted while its step ran
                continue
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_full_blocks(request)
            if not chunk.samples:
                continue
            if request.max_tokens == 0:  # prompt scoring only (echo with max_tokens=0)
                self.running.remove(request)
                self._finish(request, "length", now)
                touched.append(request)
                continue
            request.token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            reason = self._stop_reason(request, token)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason, now)
            touched.append(request)
        self.on_step_end(plan, now)
        return touched

    def on_step_end(self, plan: StepPlan, now: float) -> None:
        """Hook for policies that keep per-step state (deadlines, fitted time models)."""

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        waiting_prefill = sum(r.num_uncomputed_tokens for r in self.waiting)
        outstanding = float(waiting_prefill)
        for r in (*self.waiting, *self.running):
            outstanding += self.expected_remaining_output(r)
        outstanding += sum(r.num_uncomputed_tokens - 1 for r in self.running if r.is_prefilling)
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            waiting_prefill_tokens=waiting_prefill,
            running_tokens=sum(r.num_tokens for r in self.running),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            mean_step_time=self.step_time.value,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            expected_output_tokens=self.output_lengths.mean,
            output_lengths=self.output_lengths.copy(),
            outstanding_tokens=outstanding,
            busy_seconds=self.busy_seconds,
            processed_tokens=self.processed_tokens,
        )

    # ---- mechanics shared by policies -------------------------------------------------------
    def expected_output(self, request: Request) -> float:
        """Expected total output length, by the rule of scheduling/output_length.py."""
        return self.output_lengths.expected(request.num_prompt_tokens, request.max_tokens, request.ignore_eos)

    def expected_remaining_output(self, request: Request) -> float:
        return max(0.0, self.expected_output(request) - request.num_output_tokens)

    def count(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + n

    def admit(self, request: Request, now: float, budget: int) -> Chunk | None:
        """Move the head-of-line candidate `request` from waiting to running with its first chunk
        of at most `budget` tokens, if KV for that chunk can be had. Prefix-cache hits come
        first and cost no budget."""
        if request.num_computed_tokens == 0 and not request.block_ids:
            cached = self.kv.claim_cached_prefix(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = cached
        num_tokens = min(request.num_uncomputed_tokens, budget)
        if num_tokens <= 0 or not self.kv.allocate(request, num_tokens):
            # Give back the prefix blocks so they stay evictable while the request waits.
            self.kv.free_request(request)
            return None
        self.waiting.remove(request)
        self.running.append(request)
        request.status = Status.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        return Chunk(request, request.num_computed_tokens, num_tokens)

    def admit_reserving(self, request: Request, now: float, budget: int, reserve_tokens: int,
                        watermark_blocks: int = 0) -> Chunk | None:
        """`admit`, but only if KV for the request's first `reserve_tokens` tokens (its whole prompt,
        or its worst case) is free beyond `watermark_blocks`; the request then holds all of it, so
        it cannot run out of KV before it outgrows the reservation."""
        if self.kv.blocks_for(reserve_tokens) > self.kv.num_free_blocks - watermark_blocks:
            return None
        chunk = self.admit(request, now, budget)
        if chunk is not None:
            self.kv.allocate(request, reserve_tokens - request.num_computed_tokens)
        return chunk

    def continue_running(self, request: Request, budget: int) -> Chunk | None:
        """Next chunk of a running request (a decode token, or more of its prefill)."""
        num_tokens = min(request.num_uncomputed_tokens, budget)
        if num_tokens <= 0 or not self.kv.allocate(request, num_tokens):
            return None
        return Chunk(request, request.num_computed_tokens, num_tokens)

    def preempt(self, request: Request) -> None:
        """Preempt by recompute: free the KV, go back to the front of the waiting queue."""
        self.running.remove(request)
        self.kv.free_request(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _stop_reason(self, request: Request, token: int) -> str | None:
        if request.num_output_tokens >= request.min_tokens:
            if token in request.stop_token_ids:
                return "stop"
            if not request.ignore_eos and token in self.config.eos_token_ids:
                return "stop"
        if request.num_output_tokens >= request.max_tokens:
            return "length"
        if request.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, request: Request, reason: str, now: float | None) -> None:
        self.kv.free_request(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finished_time = now
        del self.requests[request.request_id]
        if reason != "abort":
            self.output_lengths.observe(request.num_prompt_tokens, request.num_output_tokens)
