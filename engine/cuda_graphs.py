"""CUDA graphs for decode steps: one graph per batch-size bucket, captured once at start-up over the
runner's input buffers (engine/step_inputs.py); a decode step of n sequences is written there padded to
the smallest bucket >= n and replays that bucket's graph. Prefill and mixed steps run eagerly.

Graphs remove the per-kernel launch cost that dominates small decode batches. They need an attention
backend that reads only device tensors and runs compiled kernels (`supports_cuda_graphs`).
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionMetadata
from .step_inputs import InputBuffers

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, kv_caches, inputs: InputBuffers, max_batch: int, max_model_len: int,
                 device: torch.device):
        self.model, self.kv_caches, self.inputs = model, kv_caches, inputs
        self.max_batch, self.max_model_len, self.device = max_batch, max_model_len, device
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        inputs.pad_all()  # captured kernels run on padding rows: valid, harmless inputs
        # inference_mode: a graph captured with autograd on would keep every bucket's saved activations.
        with torch.inference_mode(), torch.cuda.device(device):
            for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
                self._capture(bs)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _meta(self, bs: int) -> AttentionMetadata:
        # max_seq_len is the capacity, so kernels pick launch shapes that hold for every replay.
        b = self.inputs
        return AttentionMetadata(slot_mapping=b.slots_dev[:bs], query_start_loc=b.qsl_dev[:bs + 1],
                                 seq_lens=b.seq_lens_dev[:bs], block_tables=b.tables_dev[:bs], max_query_len=1,
                                 max_seq_len=self.max_model_len, num_decodes=bs, query_lens_host=[1] * bs,
                                 seq_lens_host=[self.max_model_len] * bs)

    def _capture(self, bs: int) -> None:
        meta, ids, positions = self._meta(bs), self.inputs.ids_dev[:bs], self.inputs.positions_dev[:bs]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle allocations outside the graph
                self.model(ids, positions, self.kv_caches, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(ids, positions, self.kv_caches, meta)
        self.pool = graph.pool()
        self.graphs[bs] = (graph, out)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def replay(self, bs: int) -> torch.Tensor:
        """Hidden states of all `bs` rows of the batch written into the input buffers."""
        graph, out = self.graphs[bs]
        graph.replay()
        return out
