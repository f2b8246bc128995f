"""How a step runs: turn a StepPlan into one forward pass over a flattened batch, then sample.

The runner owns the model, the physical KV cache tensors and the step's input buffers; from the plan it
reads only token ids, positions and the block ids the KV block manager wrote into each request.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from scheduling import Chunk, Request, StepPlan

from .attention import AttentionMetadata, make_backend
from .config import EngineArgs, ModelConfig
from .models.linear import can_prepack, warm_up
from .models.loader import load_model
from .parallel import TPGroup, check_shardable, start_group
from .sampler import SamplingBatch, SamplingRow, prompt_logprobs, sample
from .step_inputs import BatchLayout, InputBuffers

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_GB = 0.5


def retain_freed_memory() -> None:
    """Keep memory that torch frees in glibc's heap instead of giving it back to the kernel.

    A CPU step allocates megabytes of activations and gathered K/V and frees them again. By default
    glibc serves such blocks with fresh mmaps, or trims the heap after they are freed, so every step
    page-faults to touch its buffers anew: measured on the demo model at batch 64, that was 30-40% of
    a decode step. (vLLM's CPU backend reaches for tcmalloc for the same reason.) This process-wide
    setting costs a resident heap as large as the largest step's working set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # the most glibc allows: smaller blocks come from the heap
    mallopt(m_trim_threshold, 2**31 - 1)  # never shrink the heap
    mallopt(m_top_pad, 64 << 20)  # and grow it in large steps


@dataclass
class ChunkResult:
    token: int | None = None
    logprobs: tuple | None = None  # (logprob, top ids, top logprobs) of the sampled token
    prompt_logprobs: list | None = None  # one entry per prompt position this chunk scored


@dataclass
class StepInputs:
    """A step after `prepare`: its batch in the input buffers, and what sampling and scoring need."""
    layout: BatchLayout
    graph_batch: int | None  # the captured batch size to replay, or None to run eagerly
    sampled: list[int]  # chunks whose last token is sampled, in plan order
    sampling_rows: list[SamplingRow]
    scored: list[tuple[int, int, int]]  # (chunk, first flat index, count) of prompt tokens to score
    scored_next_tokens: list[int]  # the token after each scored position
    max_prompt_logprobs: int

    @classmethod
    def forward_only(cls, layout: BatchLayout) -> StepInputs:
        """An eager step whose outputs nobody samples (kernel warm-up, tests)."""
        return cls(layout, None, [], [], [], [], 0)


class ModelRunner:
    """A step in three stages: `prepare` (the plan's inputs into the staging buffers, shared by the eager
    and the CUDA-graph paths), `forward` (graph replay or eager), `sample_and_score` (the sampler and
    prompt logprobs, with the step's host synchronisation).

    Under tensor parallelism rank 0's runner (`group` None: it starts the group) runs `execute` and
    broadcasts each step's inputs between `prepare` and `forward`; the other ranks' runners run `follow`."""

    def __init__(self, config: ModelConfig, args: EngineArgs, max_model_len: int, group: TPGroup | None = None):
        self.config = config
        self.args = args
        self.device = args.resolved_device()
        if self.device.type == "cpu":
            retain_freed_memory()
        if group is None and args.tensor_parallel_size > 1:
            check_shardable(config, args.tensor_parallel_size)
            group = start_group(config.path, args, max_model_len)
        self.group = group or TPGroup()
        try:
            self._load(config, args, max_model_len)
        except BaseException:
            self.group.close(kill=True)  # the other ranks may wait in a collective this rank never reaches
            raise

    def _load(self, config: ModelConfig, args: EngineArgs, max_model_len: int) -> None:
        self.block_size = args.block_size
        self.max_model_len = max_model_len
        self.backend = make_backend(args.attention_backend, self.device, args.block_size)
        torch.manual_seed(args.seed)
        self.model = load_model(config, self.backend, self.device, max_model_len,
                                random_weights=args.load_format == "dummy", tp=self.group)
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's
        # Per-step intra-op threads (CPU, one rank): see step_threads.
        self.max_threads = torch.get_num_threads()
        self.flops_per_token = 2 * sum(p.numel() for n, p in self.model.named_parameters()
                                       if "layers." in n and p.dim() == 2)
        self.flops_per_sample = 2 * config.vocab_size * config.hidden_size
        if args.cpu_prepack_weights and can_prepack(self.device, config.dtype):
            warm_up(self.model.prepack_weights(), max(args.token_budget(self.device), args.max_num_seqs))
        self.num_blocks = self.group.min(self._num_kv_blocks())  # every rank holds the same blocks
        # One block more than the KV manager hands out: a scratch block that padded rows of a
        # CUDA-graph batch write into, so no real block is ever touched by padding.
        shape = (self.num_blocks + 1, self.block_size, self.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=config.dtype, device=self.device),
                           torch.zeros(shape, dtype=config.dtype, device=self.device))
                          for _ in range(config.num_layers)]
        self.use_graphs = (self.device.type == "cuda" and not args.enforce_eager
                           and getattr(self.backend, "supports_cuda_graphs", False))
        self.graph_max_batch = min(args.max_num_seqs, 512) if self.use_graphs else 0
        self.inputs: InputBuffers | None = None
        self.graphs = None
        self._make_inputs(max(args.max_num_batched_tokens or 0, args.max_num_seqs), args.max_num_seqs)
        if self.device.type == "cuda":
            self._warm_up()

    def _make_inputs(self, max_tokens: int, max_seqs: int) -> None:
        """(Re)build the staging buffers, and the graphs captured over them."""
        max_seqs = max(max_seqs, self.graph_max_batch)
        self.inputs = InputBuffers(max(max_tokens, max_seqs), max_seqs, -(-self.max_model_len // self.block_size),
                                   self.block_size, self.num_blocks, self.device)
        if self.use_graphs:
            from .cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.inputs, self.graph_max_batch,
                                       self.max_model_len, self.device)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile every kernel variant a step can launch before the first request is timed: the decode
        kernel per split count (a power of two chosen from the context length), prefill, mixed steps."""
        def chunk(seq_len: int, num_tokens: int) -> Chunk:  # a context that lives in the scratch block only
            r = Request("warm-up", [0] * seq_len, 1, 0.0)
            r.block_ids = [self.num_blocks] * -(-seq_len // self.block_size)
            return Chunk(r, seq_len - num_tokens, num_tokens)

        contexts = sorted({min(self.max_model_len, 256 << k) for k in range(5)})
        steps = [[chunk(n, 1)] for n in contexts] + [[chunk(32, 32)], [chunk(64, 1), chunk(48, 16)]]
        for chunks in steps:
            if sum(c.num_tokens for c in chunks) > self.inputs.max_tokens:
                continue  # a budget this small never runs such a step
            self.forward(StepInputs.forward_only(self.inputs.write(chunks, len(chunks), [])))
        torch.cuda.synchronize(self.device)

    @property
    def block_bytes(self) -> int:
        c = self.config
        return 2 * c.num_layers * self.block_size * self.num_kv_heads * c.head_dim * c.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        a = self.args
        if a.num_kv_blocks:
            return a.num_kv_blocks
        if a.kv_cache_gb:
            budget = a.kv_cache_gb * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # Leave room for activations of the largest step and the sampler's logits.
            reserve = 4 * a.max_num_batched_tokens * (self.config.hidden_size * 8 + self.config.vocab_size) + 2**30
            budget = a.gpu_memory_utilization * total - used - reserve
        else:
            budget = CPU_DEFAULT_KV_GB * 2**30
        num = int(budget // self.block_bytes)
        if num <= 0:
            raise ValueError("no memory left for the KV cache; lower the model size or raise the KV budget")
        return num

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, bitmasks: Future | None = None) -> list[ChunkResult]:
        """Run the plan (decodes first, as the scheduler guarantees); results are aligned with plan.chunks.
        `bitmasks` (structured outputs): the allowed-token bitmask row of each constrained request by
        request id, being filled on a thread while the forward pass runs."""
        step = self.prepare(plan.chunks)
        if self.group.size > 1:
            self._broadcast(step)
        elif self.device.type == "cpu" and self.max_threads > 1:
            threads = self.step_threads(step.layout)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return self.sample_and_score(plan.chunks, step, self.forward(step), bitmasks)

    def step_threads(self, layout: BatchLayout) -> int:
        """Intra-op threads for a CPU step: all the worker's for a step with enough matmul work per token,
        one fewer for a lighter one. The server's CPU work is per token (about 0.1 ms to stream one on this
        repository's 2-core machine), and it runs on the last core while a step runs; a thread pool that
        needs that core too waits for it at every fork-join. The demo model (0.006 GFLOP per token, 0.06 ms
        of one core) lost on two threads: the server needs the core. A ~100M model (0.15-0.2 GFLOP,
        2 ms per token) leaves it idle most of the time, and gained 1.5-1.8x output tok/s with its steps on
        both cores (BENCHMARKS.md, "Threads per step")."""
        threshold = self.args.cpu_parallel_min_gflop_per_token
        if threshold is None:
            return self.max_threads - 1
        flops = self.flops_per_token * layout.num_tokens + self.flops_per_sample * layout.num_sampled
        return self.max_threads if flops / layout.num_tokens >= threshold * 1e9 else self.max_threads - 1

    def _fit_inputs(self, num_tokens: int, num_seqs: int) -> None:
        if num_tokens > self.inputs.max_tokens or num_seqs > self.inputs.max_seqs:
            # A policy whose own budget exceeds the engine's (e.g. a token-budget knob): grow once.
            log.warning("a step of %d tokens in %d sequences outgrows the input buffers; growing them",
                        num_tokens, num_seqs)
            self._make_inputs(max(num_tokens, self.inputs.max_tokens), max(num_seqs, self.inputs.max_seqs))

    def _broadcast(self, step: StepInputs | None) -> StepInputs | None:
        """Rank 0 sends the step (None: stop), the others receive it; then the input buffers it filled."""
        step = self.group.broadcast(None if step is None else replace(step, sampling_rows=[], scored_next_tokens=[]))
        if step is not None:
            self._fit_inputs(step.layout.num_tokens, step.layout.num_seqs)
            for t in self.inputs.step_tensors(step.layout):
                self.group.broadcast_tensor(t)
        return step

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..N-1: run each step rank 0 broadcasts, until it says stop."""
        while (step := self._broadcast(None)) is not None:
            self.logits(step, self.forward(step))

    def prepare(self, chunks: list[Chunk]) -> StepInputs:
        num_tokens = sum(c.num_tokens for c in chunks)
        self._fit_inputs(num_tokens, len(chunks))
        graph_batch = None
        if self.graphs is not None and num_tokens == len(chunks):
            graph_batch = self.graphs.bucket(len(chunks))
        sampled = [i for i, c in enumerate(chunks) if c.samples]
        layout = self.inputs.write(chunks, graph_batch or len(chunks), sampled)
        eos = self.config.eos_token_ids
        rows = [SamplingRow(r.payload, r.prompt_token_ids, r.output_token_ids, eos)
                for r in (chunks[i].request for i in sampled)]
        scored, next_tokens, max_k, base = [], [], 0, 0
        for i, c in enumerate(chunks):
            req, params = c.request, c.request.payload
            if (params.prompt_logprobs is not None and req.num_output_tokens == 0
                    and c.start < req.num_prompt_tokens - 1):
                end = min(c.start + c.num_tokens, req.num_prompt_tokens - 1)
                scored.append((i, base, end - c.start))
                next_tokens += req.prompt_token_ids[c.start + 1:end + 1]
                max_k = max(max_k, params.prompt_logprobs)
            base += c.num_tokens
        return StepInputs(layout, graph_batch, sampled, rows, scored, next_tokens, max_k)

    def forward(self, step: StepInputs) -> torch.Tensor:
        """Hidden states of every token of the step (graph steps: of every padded row)."""
        if step.graph_batch is not None:
            return self.graphs.replay(step.graph_batch)
        b, lay = self.inputs, step.layout
        t, s = lay.num_tokens, lay.num_seqs
        meta = AttentionMetadata(
            slot_mapping=b.slots_dev[:t], query_start_loc=b.qsl_dev[:s + 1], seq_lens=b.seq_lens_dev[:s],
            block_tables=b.tables_dev[:s], max_query_len=max(lay.query_lens), max_seq_len=max(lay.seq_lens),
            num_decodes=lay.num_decodes, query_lens_host=lay.query_lens, seq_lens_host=lay.seq_lens)
        return self.model(b.ids_dev[:t], b.positions_dev[:t], self.kv_caches, meta)

    def logits(self, step: StepInputs, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The logits of the sampled rows and of the scored prompt positions (all of them in one pass). On
        every rank: the LM head is split over the ranks."""
        sampled = scored = None
        if step.sampled:
            sampled = self.model.compute_logits(hidden[self.inputs.sample_index_dev[:len(step.sampled)]])
        if step.scored:
            index = [first + k for _, first, count in step.scored for k in range(count)]
            scored = self.model.compute_logits(hidden[self._upload(index, torch.int64)])
        return sampled, scored

    def sample_and_score(self, chunks: list[Chunk], step: StepInputs, hidden: torch.Tensor,
                         bitmasks: Future | None = None) -> list[ChunkResult]:
        """Sampled tokens and prompt logprobs on the host. Sampling ends in the step's one synchronisation
        (a step that also scores prompt tokens, for `prompt_logprobs`, adds one); a step with neither
        synchronises anyway, so the step time the scheduler measures is this step's own."""
        results = [ChunkResult() for _ in chunks]
        if not step.sampled and not step.scored and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        sampled_logits, scored_logits = self.logits(step, hidden)
        if step.sampled:
            if bitmasks is not None:
                masks = bitmasks.result()
                for row, i in zip(step.sampling_rows, step.sampled):
                    row.bitmask = masks.get(chunks[i].request.request_id)
            out = sample(sampled_logits, SamplingBatch(step.sampling_rows, self.device))
            for j, i in enumerate(step.sampled):
                results[i].token = out.token_ids[j]
                results[i].logprobs = out.logprobs[j]
        if step.scored:
            entries = prompt_logprobs(scored_logits, self._upload(step.scored_next_tokens, torch.int64),
                                      step.max_prompt_logprobs)
            offset = 0
            for i, _, count in step.scored:
                k = chunks[i].request.payload.prompt_logprobs
                results[i].prompt_logprobs = [(lp, ids[:k], vals[:k]) for lp, ids, vals in entries[offset:offset + count]]
                offset += count
        return results

    def _upload(self, values: list[int], dtype) -> torch.Tensor:
        """A host list on the device; through pinned memory on CUDA, so the copy does not block."""
        host = torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)
