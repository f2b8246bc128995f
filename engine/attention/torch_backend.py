"""Pure-torch attention over the paged cache: the CPU path and the oracle for the fast kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    # index_select with int64 ids is several times faster on CPU than indexing with int32 ones.
    return cache.index_select(0, block_table[:num_blocks].long()).flatten(0, 1)[:length]


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False  # reads host-side lengths each step

    def __init__(self):
        self._layout_for = None  # the step metadata the cached decode layout belongs to
        self._layout = None

    def _decode_layout(self, meta, block_size: int):
        """Block tables and padding mask of the step's decodes, built once per step, not per layer."""
        if self._layout_for is not meta:
            nd = meta.num_decodes
            max_len = max(meta.seq_lens_host[:nd])
            tables = meta.block_tables[:nd, : -(-max_len // block_size)].flatten().long()
            mask = (torch.arange(max_len, device=tables.device)[None, :] < meta.seq_lens[:nd, None])[:, None, None, :]
            self._layout_for, self._layout = meta, (tables, mask, max_len)
        return self._layout

    def forward(self, q, k, v, k_cache, v_cache, meta, scale) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            # All decodes at once: pad every context to the longest and mask the tail.
            tables, mask, max_len = self._decode_layout(meta, k_cache.shape[1])
            shape = (nd, -1) + tuple(k_cache.shape[2:])
            keys = k_cache.index_select(0, tables).view(shape)[:, :max_len].transpose(1, 2)  # [S, Hkv, L, D]
            values = v_cache.index_select(0, tables).view(shape)[:, :max_len].transpose(1, 2)
            # The query heads sharing a KV head go in as that head's "query rows" (one token each, the
            # same mask), so K/V are never repeated per query head.
            num_kv_heads, head_dim = k_cache.shape[2:]
            grouped = q[:nd].view(nd, num_kv_heads, -1, head_dim)
            out[:nd] = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale).view(
                nd, -1, head_dim)
        start = nd
        for i in range(nd, len(meta.seq_lens_host)):
            q_len, seq_len = meta.query_lens_host[i], meta.seq_lens_host[i]
            keys = gather_context(k_cache, meta.block_tables[i], seq_len).transpose(0, 1)
            values = gather_context(v_cache, meta.block_tables[i], seq_len).transpose(0, 1)
            qs = q[start:start + q_len].transpose(0, 1)  # [H, q_len, D]
            prefix = seq_len - q_len
            if prefix == 0:
                o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=scale, enable_gqa=True)
            else:
                rows = torch.arange(q_len, device=q.device)[:, None] + prefix
                mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + q_len] = o.transpose(0, 1)
            start += q_len
        return out
