"""The engine loop's body: requests in, one scheduled step at a time, token outputs out.

Used in-process by the offline `LLM` and inside each worker process by the server.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from scheduling import KVBlockManager, SchedulerConfig, make_scheduler
from scheduling.step_cost import chunk_shapes

from .config import EngineArgs, ModelConfig
from .messages import GenerateRequest, LoadReport, RequestTimings, TokenOutput, TopLogprobs
from .model_runner import ModelRunner
from .requests import scheduler_request
from .step_log import StepLog
from .structured import BACKENDS, StructuredOutputManager
from .tokenizer import has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def _top(entry) -> TopLogprobs | None:
    return None if entry is None else TopLogprobs(entry[0], entry[1], entry[2])


class EngineCore:
    COMPILE_WAIT_S = 0.02  # with nothing to run, how long a step waits for a grammar before returning

    def __init__(self, model_path, args: EngineArgs | None = None, worker_id: int = 0):
        args = args or EngineArgs()
        device = args.resolved_device()
        if args.max_num_batched_tokens is None:  # a copy: the caller's arguments stay as they were
            args = dataclasses.replace(args, max_num_batched_tokens=args.token_budget(device))
        self.args = args
        self.worker_id = worker_id
        self.model_config = config = ModelConfig.load(model_path, args.dtype)
        self.max_model_len = args.max_model_len or config.max_position_embeddings
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        self.runner = ModelRunner(config, args, self.max_model_len)
        self.kv = KVBlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching,
                                 args.prefix_cache_hash_salt)
        pool_tokens = self.kv.num_blocks * args.block_size
        if self.max_model_len > pool_tokens:
            # A sequence longer than the whole pool could never be scheduled again once it grew.
            log.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it", self.max_model_len, pool_tokens)
            self.max_model_len = pool_tokens
        sched_config = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       max_model_len=self.max_model_len,
                                       eos_token_ids=config.eos_token_ids, output_length=args.output_length)
        self.scheduler = make_scheduler(args.scheduler, sched_config, self.kv, args.scheduler_knobs or None)
        if args.structured_outputs_backend not in BACKENDS:
            raise ValueError(f"unknown structured outputs backend {args.structured_outputs_backend!r}; "
                             f"choose {', '.join(BACKENDS)}")
        # Grammars need the tokenizer's vocabulary: without one, constrained requests are refused.
        self.structured = StructuredOutputManager(
            args.structured_outputs_backend, lambda: load_tokenizer(config.path), config.vocab_size,
            config.eos_token_ids) if has_tokenizer(config.path) else None
        self.prompt_logprobs: dict[str, list] = {}
        self.requests_in = 0
        self.step_log = StepLog(args.step_log, worker_id) if args.step_log else None
        log.info("engine: %s (%s, %s) on %s, attention %s, %d KV blocks of %d tokens, scheduler %s",
                 config.path, config.architecture, str(config.dtype).removeprefix("torch."), device,
                 self.runner.backend.name, self.kv.num_blocks, args.block_size, args.scheduler)

    # ---- requests -----------------------------------------------------------------------------
    def validate(self, message: GenerateRequest) -> None:
        n = len(message.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, but this model's maximum context length is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in message.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t < 0 or t >= vocab for t in message.sampling.stop_token_ids):  # the sampler indexes logits with them
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if message.request_id in self.scheduler.requests or (self.structured and message.request_id in self.structured):
            raise ValueError(f"request id {message.request_id!r} is already in use")
        s = message.sampling
        s.validate()
        if s.logit_bias and any(t < 0 or t >= vocab for t in s.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if s.structured_outputs is not None:
            if self.structured is None:
                raise ValueError("structured_outputs needs a model with a tokenizer; this one has none")
            # The grammar decides where the output ends; these would fight it.
            if s.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured_outputs")
            if s.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs")
            self.structured.check(s.structured_outputs)

    def add_request(self, message: GenerateRequest) -> None:
        # Counted even when refused: the balancer reconciles what it sent against this number.
        self.requests_in += 1
        self.validate(message)
        request = scheduler_request(message, payload=message.sampling)
        if message.sampling.structured_outputs is None:
            self.scheduler.add(request)
        else:  # joins the scheduler in a later step, once its grammar is compiled
            self.structured.submit(request, message.sampling.structured_outputs)
        if self.step_log is not None:
            self.step_log.arrival(message.request_id, message.arrival_time, len(message.prompt_token_ids),
                                  message.sampling.max_tokens)

    def abort(self, request_id: str) -> TokenOutput | None:
        self.prompt_logprobs.pop(request_id, None)
        request = self.scheduler.abort(request_id)
        if self.structured is not None:
            request = self.structured.abort(request_id) or request
        return None if request is None else TokenOutput(request_id, [], finish_reason="abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.structured and self.structured.pending)

    def _admit_compiled(self) -> list[TokenOutput]:
        """Constrained requests whose grammar is ready join the scheduler; failed compiles end here."""
        ready, failed = self.structured.ready()
        for request in ready:
            self.scheduler.add(request)
        return [TokenOutput(r.request_id, [], finish_reason="error", error=error, status=400) for r, error in failed]

    # ---- one step -------------------------------------------------------------------------------
    def step(self, now: float | None = None) -> list[TokenOutput]:
        outputs = self._admit_compiled() if self.structured is not None else []
        start = time.monotonic()
        now = start if now is None else now
        plan = self.scheduler.schedule(now)
        if not plan:
            if self.structured is not None and self.structured.pending and not outputs:
                self.structured.wait(self.COMPILE_WAIT_S)  # nothing to run until a grammar is ready
            return outputs
        shapes = chunk_shapes(plan) if self.step_log is not None else None
        t0 = time.perf_counter()
        bitmasks = None
        if self.structured is not None and self.structured.grammars:
            bitmasks = self.structured.bitmasks([c.request for c in plan.chunks if c.samples])
        results = self.runner.execute(plan, bitmasks)
        elapsed = time.perf_counter() - t0
        done = time.monotonic()
        for chunk, res in zip(plan.chunks, results):
            if res.prompt_logprobs is not None:
                if chunk.start == 0:  # (re)starting the prompt: drop what a preempted pass scored
                    self.prompt_logprobs[chunk.request.request_id] = [None]
                self.prompt_logprobs[chunk.request.request_id] += res.prompt_logprobs
        touched = self.scheduler.update(plan, [r.token for r in results], done, elapsed)
        rejected = set(map(id, self.structured.advance(touched))) if self.structured is not None else set()
        touched = set(map(id, touched))
        for chunk, res in zip(plan.chunks, results):
            request = chunk.request
            if id(request) not in touched:
                continue
            new = [] if res.token is None or request.max_tokens == 0 else [res.token]
            out = TokenOutput(request.request_id, new,
                              logprobs=[_top(res.logprobs)] if res.logprobs and new else None,
                              finish_reason=request.finish_reason,
                              num_cached_tokens=max(request.num_cached_tokens, 0))
            if (request.request_id in self.prompt_logprobs
                    and chunk.start + chunk.num_tokens >= request.num_prompt_tokens):
                out.prompt_logprobs = [_top(e) for e in self.prompt_logprobs.pop(request.request_id)]
            if id(request) in rejected:  # cannot happen while the mask is applied; never let it pass silently
                self.abort(request.request_id)
                out.finish_reason, out.error, out.status = "error", "structured outputs: grammar rejected a token", 500
            if request.num_output_tokens <= 1 or request.finish_reason:
                out.timings = RequestTimings(queue_s=(request.first_scheduled_time or done) - request.arrival_time,
                                             num_preemptions=request.num_preemptions)
            outputs.append(out)
        if self.step_log is not None:
            self.step_log.record(start, time.time() - (time.monotonic() - start), elapsed, shapes,
                                 [c.request.request_id for c in plan.chunks],
                                 [id(c.request) in touched for c in plan.chunks], self.scheduler.has_work())
        return outputs

    def load_report(self) -> LoadReport:
        return LoadReport(worker_id=self.worker_id, stats=self.scheduler.stats(), requests_in=self.requests_in,
                          counters=dict(self.scheduler.counters), time=time.monotonic())
