"""`triton` attention backend: in-repo Triton paged-attention kernels (engine/attention/triton_kernels.py).

Importing this module never fails; a missing triton is reported when the backend is constructed, so the
`auto` backend selection can probe it cheaply.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    from engine.attention import triton_kernels as _kernels
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not installed: expected on CPU-only machines, said when the backend is asked for
    _kernels = None
    _IMPORT_ERROR = e
except Exception as e:  # noqa: BLE001 - installed but broken (driver, compiler): say so at once
    _kernels = None
    _IMPORT_ERROR = e
    log.warning("triton is installed but failed to load; the triton attention backend is unavailable: %r", e)


class TritonAttentionBackend:
    name = "triton"

    def __init__(self) -> None:
        if _kernels is None:
            raise RuntimeError(f"the triton attention backend needs the triton package: {_IMPORT_ERROR!r}")
        # Interpreted kernels (TRITON_INTERPRET=1) copy tensors through the host: never capturable.
        self.supports_cuda_graphs = not _kernels.INTERPRETED

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the new tokens -> attention output [T, H, D].

        Stores k/v into the paged cache first (the kernels read the new tokens back from it). Sequences with
        one new token go to the split-KV decode kernel, the rest to the prefill kernel. When meta has
        `num_decodes` (decode sequences first, as the model runner orders them), a mixed batch is split
        between the two kernels; otherwise only an all-decode batch (`is_decode`) uses the decode kernel.
        Output rows of padding tokens (beyond query_start_loc[-1]) are unspecified.
        """
        _kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_seqs = meta.seq_lens.shape[0]
        nd = num_seqs if meta.is_decode else getattr(meta, "num_decodes", 0)
        nd = min(nd, q.shape[0])  # decode kernel maps sequence i to token i
        if nd > 0:
            _kernels.paged_decode_attention(q[:nd], k_cache, v_cache, meta.seq_lens[:nd], meta.block_tables[:nd],
                                            scale, out[:nd], max_seq_len=meta.max_seq_len)
        if nd < num_seqs:
            # query_start_loc holds absolute token offsets, so the prefill part keeps indexing the full q/out.
            _kernels.paged_prefill_attention(q, k_cache, v_cache, meta.query_start_loc[nd:], meta.seq_lens[nd:],
                                             meta.block_tables[nd:], scale, meta.max_query_len, out)
        return out
