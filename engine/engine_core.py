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

log = logging.getLogger(__name__)


def _top(entry) -> TopLogprobs | None:
    return None if entry is None else TopLogprobs(entry[0], entry[1], entry[2])


class EngineCore:
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
        if message.request_id in self.scheduler.requests:
            raise ValueError(f"request id {message.request_id!r} is already in use")
        message.sampling.validate()

    def add_request(self, message: GenerateRequest) -> None:
        # Counted even when refused: the balancer reconciles what it sent against this number.
        self.requests_in += 1
        self.validate(message)
        self.scheduler.add(scheduler_request(message, payload=message.sampling))
        if self.step_log is not None:
            self.step_log.arrival(message.request_id, message.arrival_time, len(message.prompt_token_ids),
                                  message.sampling.max_tokens)

    def abort(self, request_id: str) -> TokenOutput | None:
        self.prompt_logprobs.pop(request_id, None)
        request = self.scheduler.abort(request_id)
        return None if request is None else TokenOutput(request_id, [], finish_reason="abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------
    def step(self, now: float | None = None) -> list[TokenOutput]:
        start = time.monotonic()
        now = start if now is None else now
        plan = self.scheduler.schedule(now)
        if not plan:
            return []
        shapes = chunk_shapes(plan) if self.step_log is not None else None
        t0 = time.perf_counter()
        results = self.runner.execute(plan)
        elapsed = time.perf_counter() - t0
        done = time.monotonic()
        for chunk, res in zip(plan.chunks, results):
            if res.prompt_logprobs is not None:
                if chunk.start == 0:  # (re)starting the prompt: drop what a preempted pass scored
                    self.prompt_logprobs[chunk.request.request_id] = [None]
                self.prompt_logprobs[chunk.request.request_id] += res.prompt_logprobs
        touched = set(map(id, self.scheduler.update(plan, [r.token for r in results], done, elapsed)))
        outputs = []
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
