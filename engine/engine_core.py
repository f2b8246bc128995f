"""The engine loop's body: requests in, one scheduled step at a time, token outputs out.

Used in-process by the offline `LLM` and inside each worker process by the server.
"""

from __future__ import annotations

import logging
import time

from scheduling import KVBlockManager, Request, SchedulerConfig, make_scheduler

from .config import EngineArgs, ModelConfig
from .messages import GenerateRequest, LoadReport, RequestTimings, TokenOutput, TopLogprobs
from .model_runner import ModelRunner
from .structured import BACKENDS, StructuredOutputManager
from .tokenizer import has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def _top(entry) -> TopLogprobs | None:
    return None if entry is None else TopLogprobs(entry[0], entry[1], entry[2])


class EngineCore:
    COMPILE_WAIT_S = 0.02  # with nothing to run, how long a step waits for a grammar before returning

    def __init__(self, model_path, args: EngineArgs | None = None, worker_id: int = 0):
        self.args = args = args or EngineArgs()
        self.worker_id = worker_id
        self.model_config = config = ModelConfig.load(model_path, args.dtype)
        self.max_model_len = args.max_model_len or config.max_position_embeddings
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        device = args.resolved_device()
        if args.max_num_batched_tokens is None:
            args.max_num_batched_tokens = 2048 if device.type == "cuda" else 512
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
        if args.structured_outputs_backend not in BACKENDS:
            raise ValueError(f"unknown structured outputs backend {args.structured_outputs_backend!r}; "
                             f"choose {', '.join(BACKENDS)}")
        # Grammars need the tokenizer's vocabulary: without one, constrained requests are refused.
        self.structured = StructuredOutputManager(
            args.structured_outputs_backend, lambda: load_tokenizer(config.path), config.vocab_size,
            config.eos_token_ids) if has_tokenizer(config.path) else None
        self.prompt_logprobs: dict[str, list] = {}
        self.requests_in = 0
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
        if req.request_id in self.scheduler.requests or (self.structured and req.request_id in self.structured):
            raise ValueError(f"request id {req.request_id!r} is already in use")
        s = req.sampling
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

    def add_request(self, req: GenerateRequest) -> None:
        # Counted even when refused: the balancer reconciles what it sent against this number.
        self.requests_in += 1
        self.validate(req)
        s = req.sampling
        # A request can never need more KV than the whole pool.
        if self.kv.blocks_for(n := len(req.prompt_token_ids) + 1) > self.kv.num_blocks:
            raise ValueError(f"prompt of {n - 1} tokens does not fit in the KV cache")
        request = Request(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            max_tokens=s.max_tokens, arrival_time=req.arrival_time, min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos, stop_token_ids=frozenset(s.stop_token_ids), priority=req.priority,
            ttft_slo_s=None if req.slo.ttft_ms is None else req.slo.ttft_ms / 1000,
            tbt_slo_s=None if req.slo.tbt_ms is None else req.slo.tbt_ms / 1000,
            payload=s)
        if s.structured_outputs is None:
            self.scheduler.add(request)
        else:  # joins the scheduler in a later step, once its grammar is compiled
            self.structured.submit(request, s.structured_outputs)

    def abort(self, request_id: str) -> TokenOutput | None:
        self.prompt_logprobs.pop(request_id, None)
        req = self.scheduler.abort(request_id)
        if self.structured is not None:
            req = self.structured.abort(request_id) or req
        return None if req is None else TokenOutput(request_id, [], finish_reason="abort")

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
        now = time.monotonic() if now is None else now
        plan = self.scheduler.schedule(now)
        if not plan:
            if self.structured is not None and self.structured.pending and not outputs:
                self.structured.wait(self.COMPILE_WAIT_S)  # nothing to run until a grammar is ready
            return outputs
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
            req = chunk.request
            if id(req) not in touched:
                continue
            new = [] if res.token is None or req.max_tokens == 0 else [res.token]
            out = TokenOutput(req.request_id, new,
                              logprobs=[_top(res.logprobs)] if res.logprobs and new else None,
                              finish_reason=req.finish_reason, num_cached_tokens=max(req.num_cached_tokens, 0))
            if req.request_id in self.prompt_logprobs and chunk.start + chunk.num_tokens >= req.num_prompt_tokens:
                out.prompt_logprobs = [_top(e) for e in self.prompt_logprobs.pop(req.request_id)]
            if id(req) in rejected:  # cannot happen while the mask is applied; never let it pass silently
                self.abort(req.request_id)
                out.finish_reason, out.error, out.status = "error", "structured outputs: grammar rejected a token", 500
            if req.num_output_tokens <= 1 or req.finish_reason:
                out.timings = RequestTimings(queue_s=(req.first_scheduled_time or done) - req.arrival_time,
                                             num_preemptions=req.num_preemptions)
            outputs.append(out)
        return outputs

    def load_report(self) -> LoadReport:
        return LoadReport(worker_id=self.worker_id, stats=self.scheduler.stats(), requests_in=self.requests_in,
                          counters=dict(self.scheduler.counters), time=time.monotonic())
