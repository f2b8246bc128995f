"""How a step runs: turn a StepPlan into one forward pass over a flattened batch, then sample.

The runner owns the model and the physical KV cache tensors; from the plan it reads only token ids,
positions and the block ids the KV block manager wrote into each request.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from scheduling import StepPlan

from .attention import AttentionMetadata, make_backend
from .config import EngineArgs, ModelConfig
from .messages import SamplingParams
from .models.loader import load_model
from .sampler import SamplingBatch, SamplingRow, prompt_logprobs, sample

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


class ModelRunner:
    def __init__(self, config: ModelConfig, args: EngineArgs, max_model_len: int):
        self.config = config
        self.args = args
        self.device = args.resolved_device()
        if self.device.type == "cpu":
            retain_freed_memory()
        self.block_size = args.block_size
        self.backend = make_backend(args.attention_backend, self.device, args.block_size)
        torch.manual_seed(args.seed)
        self.model = load_model(config, self.backend, self.device, max_model_len,
                                random_weights=args.load_format == "dummy")
        self.num_blocks = self._num_kv_blocks()
        # One block more than the KV manager hands out: a scratch block that padded rows of a
        # CUDA-graph batch write into, so no real block is ever touched by padding.
        shape = (self.num_blocks + 1, self.block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=config.dtype, device=self.device),
                           torch.zeros(shape, dtype=config.dtype, device=self.device))
                          for _ in range(config.num_layers)]
        self.graphs = None
        if self.device.type == "cuda" and not args.enforce_eager and self.backend.name != "torch":
            from .cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self.model, self.kv_caches, min(args.max_num_seqs, 512), max_model_len,
                                       self.block_size, self.num_blocks, self.device)

    @property
    def block_bytes(self) -> int:
        c = self.config
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * c.dtype.itemsize

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
        """Run the plan; results are aligned with plan.chunks. `bitmasks` (structured outputs): the
        allowed-token bitmask row of each constrained request by request id, being filled on a
        thread while the forward pass runs."""
        # Decodes first: the attention backends take them as one batch.
        order = sorted(range(len(plan.chunks)), key=lambda i: plan.chunks[i].num_tokens != 1)
        chunks = [plan.chunks[i] for i in order]
        tokens, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        sample_index, sample_rows, sample_ids = [], [], []
        scored = []  # (chunk position in `chunks`, flat indices, next tokens, k) for prompt logprobs
        bs = self.block_size
        for ci, chunk in enumerate(chunks):
            req, start, n = chunk.request, chunk.start, chunk.num_tokens
            base = len(tokens)
            tokens += req.token_ids[start:start + n]
            positions += range(start, start + n)
            blocks = req.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(blocks)
            params: SamplingParams = req.payload
            if chunk.samples:
                sample_index.append(base + n - 1)
                sample_rows.append(SamplingRow(params, req.prompt_token_ids, req.output_token_ids,
                                               self.config.eos_token_ids))
                sample_ids.append(req.request_id)
            if (params.prompt_logprobs is not None and req.num_output_tokens == 0
                    and start < req.num_prompt_tokens - 1):
                end = min(start + n, req.num_prompt_tokens - 1)
                scored.append((ci, list(range(base, base + end - start)),
                               req.prompt_token_ids[start + 1:end + 1], params.prompt_logprobs))
        dev = self.device
        if self.graphs is not None and len(query_lens) == len(tokens) <= self.graphs.max_batch:
            hidden = self.graphs.run(tokens, positions, slots, seq_lens, tables)
        else:
            hidden = self._forward_eager(tokens, positions, slots, query_lens, seq_lens, tables)

        results = [ChunkResult() for _ in chunks]
        if sample_index:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=dev)])
            if bitmasks is not None:
                masks = bitmasks.result()
                for row, rid in zip(sample_rows, sample_ids):
                    row.bitmask = masks.get(rid)
            out = sample(logits, SamplingBatch(sample_rows, dev))
            sampling_chunks = [ci for ci, c in enumerate(chunks) if c.samples]
            for j, ci in enumerate(sampling_chunks):
                results[ci].token = out.token_ids[j]
                results[ci].logprobs = out.logprobs[j]
        for ci, index, next_tokens, k in scored:
            logits = self.model.compute_logits(hidden[torch.tensor(index, device=dev)])
            results[ci].prompt_logprobs = prompt_logprobs(logits, torch.tensor(next_tokens, device=dev), k)
        # Back to the plan's order.
        aligned: list[ChunkResult] = [ChunkResult()] * len(chunks)
        for pos_in_sorted, original in enumerate(order):
            aligned[original] = results[pos_in_sorted]
        return aligned

    def _upload(self, values, dtype) -> torch.Tensor:
        """A host list or tensor on the device; through pinned memory on CUDA, so the copy is async."""
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _forward_eager(self, tokens, positions, slots, query_lens, seq_lens, tables) -> torch.Tensor:
        width = max(len(t) for t in tables)
        table = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=self._upload(slots, torch.int64), query_start_loc=self._upload(qsl, torch.int32),
            seq_lens=self._upload(seq_lens, torch.int32), block_tables=self._upload(table, torch.int32),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            num_decodes=sum(1 for q in query_lens if q == 1), query_lens_host=query_lens, seq_lens_host=seq_lens)
        return self.model(self._upload(tokens, torch.int64), self._upload(positions, torch.int64), self.kv_caches, meta)
