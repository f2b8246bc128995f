"""The engine loop's body: requests in, one scheduled step at a time, token outputs out.

Used in-process by the offline `LLM` and inside each worker process by the server.
"""

from __future__ import annotations

import logging
import time

from scheduling import KVBlockManager, Request, SchedulerConfig, make_scheduler
from scheduling.step_cost import chunk_shapes

from .config import EngineArgs, ModelConfig
from .messages import GenerateRequest, LoadReport, RequestTimings, TokenOutput, TopLogprobs
from .model_runner import ModelRunner
from .step_log import StepLog

log = logging.getLogger(__name__)


def _top(entry) -> TopLogprobs | None:
    return None if entry is None else TopLogprobs(entry[0], entry[1], entry[2])


class EngineCore:
    def __init__(self, model_path, args: EngineArgs | None = None, worker_id: int = 0):
        self.args = args = args or EngineArgs()
        self.worker_id = worker_id
        self.model_config = config = ModelConfig.load(model_path, args.dtype)
        self.max_model_len = args.max_model_len or config.max_position_embeddings
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        device = args.resolved_device()
        args.max_num_batched_tokens = args.token_budget(device)
        self.runner = ModelRunner(config, args, self.max_model_len)
        self.kv = KVBlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        pool_tokens = self.kv.num_blocks * args.block_size
        if self.max_model_len > pool_tokens:
            # A sequence longer than the whole pool could never be scheduled again once it grew.
            log.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it", self.max_model_len, pool_tokens)
            self.max_model_len = pool_tokens
        sched_config = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       max_model_len=self.max_model_len,
                                       eos_token_ids=config.eos_token_ids)
        self.scheduler = make_scheduler(args.scheduler, sched_config, self.kv, args.scheduler_knobs or None)
        self.prompt_logprobs: dict[str, list] = {}
        self.requests_in = 0
        self.step_log = StepLog(args.step_log, worker_id) if args.step_log else None
        log.info("engine: %s (%s, %s) on %s, attention %s, %d KV blocks of %d tokens, scheduler %s",
                 config.path, config.architecture, str(config.dtype).removeprefix("torch."), device,
                 self.runner.backend.name, self.kv.num_blocks, args.block_size, args.scheduler)

    # ---- requests -----------------------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, but this model's maximum context length is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t < 0 or t >= vocab for t in req.sampling.stop_token_ids):  # the sampler indexes logits with them
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        req.sampling.validate()

    def add_request(self, req: GenerateRequest) -> None:
        # Counted even when refused: the balancer reconciles what it sent against this number.
        self.requests_in += 1
        self.validate(req)
        s = req.sampling
        # A request can never need more KV than the whole pool.
        if self.kv.blocks_for(n := len(req.prompt_token_ids) + 1) > self.kv.num_blocks:
            raise ValueError(f"prompt of {n - 1} tokens does not fit in the KV cache")
        self.scheduler.add(Request(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            max_tokens=s.max_tokens, arrival_time=req.arrival_time, min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos, stop_token_ids=frozenset(s.stop_token_ids), priority=req.priority,
            ttft_slo_s=None if req.slo.ttft_ms is None else req.slo.ttft_ms / 1000,
            tbt_slo_s=None if req.slo.tbt_ms is None else req.slo.tbt_ms / 1000,
            payload=s))
        if self.step_log is not None:
            self.step_log.arrival(req.request_id, req.arrival_time, n - 1, s.max_tokens)

    def abort(self, request_id: str) -> TokenOutput | None:
        self.prompt_logprobs.pop(request_id, None)
        req = self.scheduler.abort(request_id)
        return None if req is None else TokenOutput(request_id, [], finish_reason="abort")

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
            req = chunk.request
            if id(req) not in touched:
                continue
            new = [] if res.token is None or req.max_tokens == 0 else [res.token]
            out = TokenOutput(req.request_id, new,
                              logprobs=[_top(res.logprobs)] if res.logprobs and new else None,
                              finish_reason=req.finish_reason, num_cached_tokens=max(req.num_cached_tokens, 0))
            if req.request_id in self.prompt_logprobs and chunk.start + chunk.num_tokens >= req.num_prompt_tokens:
                out.prompt_logprobs = [_top(e) for e in self.prompt_logprobs.pop(req.request_id)]
            if req.num_output_tokens <= 1 or req.finish_reason:
                out.timings = RequestTimings(queue_s=(req.first_scheduled_time or done) - req.arrival_time,
                                             num_preemptions=req.num_preemptions)
            outputs.append(out)
        if self.step_log is not None:
            self.step_log.record(start, time.time() - (time.monotonic() - start), elapsed, shapes,
                                 [c.request.request_id for c in plan.chunks],
                                 [id(c.request) in touched for c in plan.chunks], self.scheduler.has_work())
        return outputs

    def load_report(self) -> LoadReport:
        return LoadReport(worker_id=self.worker_id, stats=self.scheduler.stats(), requests_in=self.requests_in,
                          counters=dict(self.scheduler.counters), time=time.monotonic())
