"""CUDA graphs for decode steps: one graph per batch-size bucket, captured once at start-up over
static input buffers; a decode step of n sequences replays the smallest bucket >= n with the
padding rows pointed at a scratch KV block. Prefill steps run eagerly.

Graphs remove the per-kernel launch cost that dominates small decode batches. They need an attention
backend that reads only device tensors (triton, flash-attn, torch-flash), not the torch reference.
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionMetadata

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_model_len: int, block_size: int, scratch_block: int,
                 device: torch.device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.max_batch = max_batch
        self.block_size, self.scratch_block = block_size, scratch_block
        self.max_model_len = max_model_len
        width = -(-max_model_len // block_size)
        # Device buffers the graphs read, and pinned host buffers that stage each step's values.
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), scratch_block * block_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.full((max_batch, width), scratch_block, dtype=torch.int32, device=device)
        self.qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.host = {name: torch.empty_like(t, device="cpu").pin_memory()
                     for name, t in (("ids", self.ids), ("pos", self.pos), ("slots", self.slots),
                                     ("seq_lens", self.seq_lens), ("tables", self.tables))}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._capture(bs)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _meta(self, bs: int) -> AttentionMetadata:
        # max_seq_len is the capacity, so kernels pick launch shapes that hold for every replay.
        return AttentionMetadata(slot_mapping=self.slots[:bs], query_start_loc=self.qsl[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.tables[:bs], max_query_len=1,
                                 max_seq_len=self.max_model_len, num_decodes=bs, query_lens_host=[1] * bs,
                                 seq_lens_host=[self.max_model_len] * bs)

    def _capture(self, bs: int) -> None:
        meta = self._meta(bs)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle allocations outside the graph
                self.model(self.ids[:bs], self.pos[:bs], self.kv_caches, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(self.ids[:bs], self.pos[:bs], self.kv_caches, meta)
        self.pool = graph.pool()
        self.graphs[bs] = (graph, out)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, tokens: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Hidden states of a decode step of len(tokens) sequences (one token each)."""
        n = len(tokens)
        bs = self.bucket(n)
        h = self.host
        h["ids"][:n] = torch.tensor(tokens)
        h["pos"][:n] = torch.tensor(positions)
        h["slots"][:n] = torch.tensor(slots)
        h["seq_lens"][:n] = torch.tensor(seq_lens)
        width = max(len(t) for t in tables)
        block_rows = torch.full((n, width), self.scratch_block, dtype=torch.int32)
        for i, t in enumerate(tables):
            block_rows[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        h["tables"][:n, :width] = block_rows
        # Padding rows write their K/V into the scratch block and attend to one token of it.
        h["ids"][n:bs] = 0
        h["pos"][n:bs] = 0
        h["slots"][n:bs] = self.scratch_block * self.block_size
        h["seq_lens"][n:bs] = 1
        h["tables"][n:bs, 0] = self.scratch_block
        for name, dev in (("ids", self.ids), ("pos", self.pos), ("slots", self.slots),
                          ("seq_lens", self.seq_lens)):
            dev[:bs].copy_(h[name][:bs], non_blocking=True)
        self.tables[:bs, :width].copy_(h["tables"][:bs, :width], non_blocking=True)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n]
