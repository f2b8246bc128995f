"""FlashAttention backends over the paged cache: the flash-attn package, or the FlashAttention that
ships inside PyTorch (>= 2.13, `torch.nn.attention.varlen.varlen_attn` with `block_table`).

Both take the whole step, prefill chunks and decodes together, in one varlen call whose keys are
read through the block table; new K/V are first written into the cache by slot mapping. CUDA only.
"""

from __future__ import annotations

import inspect

import torch

from .torch_backend import store_kv


def make(name: str, block_size: int):
    if not torch.cuda.is_available():
        raise RuntimeError(f"{name} needs a CUDA device")
    if name == "flash-attn":
        from flash_attn import flash_attn_varlen_func  # ImportError: auto tries the next backend
        if block_size % 256:
            # flash-attn 2 reads a paged cache only in pages of a multiple of 256 tokens.
            raise RuntimeError(f"flash-attn needs --block-size a multiple of 256, not {block_size}")
        return FlashAttnBackend(flash_attn_varlen_func)
    from torch.nn.attention import varlen
    if "block_table" not in inspect.signature(varlen.varlen_attn).parameters:
        raise RuntimeError(f"torch {torch.__version__} has no paged varlen_attn (needs torch >= 2.13)")
    return TorchFlashBackend(varlen.varlen_attn)


def _cu_seqlens_k(meta) -> torch.Tensor:
    cu = torch.zeros(meta.seq_lens.numel() + 1, dtype=torch.int32, device=meta.seq_lens.device)
    torch.cumsum(meta.seq_lens, 0, out=cu[1:])
    return cu


class FlashAttnBackend:
    name = "flash-attn"
    supports_cuda_graphs = True

    def __init__(self, fn):
        self.fn = fn

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        # Causal masks align to the bottom right when keys outnumber queries: the new tokens are the
        # last ones of each context, which is what a chunk over a cached prefix needs.
        return self.fn(q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=_cu_seqlens_k(meta),
                       max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale,
                       causal=True, block_table=meta.block_tables)


class TorchFlashBackend:
    name = "torch-flash"
    supports_cuda_graphs = True

    def __init__(self, fn):
        self.fn = fn

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.fn(q, k_cache, v_cache, meta.query_start_loc, _cu_seqlens_k(meta), meta.max_query_len,
                       meta.max_seq_len, scale=scale, window_size=(-1, 0), enable_gqa=True,
                       seqused_k=meta.seq_lens, block_table=meta.block_tables)
