"""Attention over the paged KV cache, behind one interface with several backends.

Cache layout, per layer: `k_cache` and `v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A step's tokens are flattened, decodes (one new token) first, then prefill chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token (negative: padding, skip)
    query_start_loc: torch.Tensor  # int32 [S+1]
    seq_lens: torch.Tensor  # int32 [S]: context length including the new tokens
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # the first `num_decodes` sequences have one new token each
    query_lens_host: list[int]
    seq_lens_host: list[int]

    @property
    def is_decode(self) -> bool:
        return self.num_decodes == len(self.seq_lens_host)


BACKENDS = ("flash-attn", "torch-flash", "triton", "torch")  # `auto` on a GPU tries them in this order
CPU_BACKENDS = ("cpu", "torch")  # and on a CPU these


def make_backend(name: str, device: torch.device, block_size: int = 16):
    """The attention backend called `name`, or with `auto` the first of BACKENDS (CPU_BACKENDS on a CPU)
    that works here."""
    from .torch_backend import TorchAttentionBackend
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu attention backend runs on CPU, not {device}")
        from .cpu_backend import CpuAttentionBackend
        return CpuAttentionBackend()
    if name == "auto":
        if device.type == "cpu":
            try:
                return make_backend("cpu", device, block_size)
            except Exception as e:  # noqa: BLE001 - a compiler error is any exception type; the reference works
                log.warning("the cpu attention kernel is unavailable (%r); using the torch reference backend, "
                            "which gathers a copy of the context every step", e)
        if device.type != "cuda":
            return TorchAttentionBackend()
        failures = []
        for candidate in BACKENDS[:-1]:
            try:
                return make_backend(candidate, device, block_size)
            except (ImportError, RuntimeError) as e:
                log.info("attention backend %s unavailable: %s", candidate, e)
                failures.append(f"{candidate}: {e}")
        # Not silent: on a GPU this fallback is several times slower and runs without CUDA graphs.
        log.warning("no fast attention backend works on %s (%s); falling back to the torch reference "
                    "backend, without CUDA graphs", device, "; ".join(failures))
        return TorchAttentionBackend()
    if name == "triton":
        from .triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    if name in ("flash-attn", "torch-flash"):
        from . import flash_backend
        return flash_backend.make(name, block_size)
    choices = ", ".join(BACKENDS[:-1] + CPU_BACKENDS)
    raise ValueError(f"unknown attention backend {name!r}; choose auto, {choices}")
