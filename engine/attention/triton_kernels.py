"""Triton paged-attention kernels: KV store, causal prefill over a paged context, split-KV decode.

Cache layout (per layer): k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim].
A flattened batch of T new tokens from S sequences is described by
  slot_mapping    int64 [T]    block_id * block_size + offset of each new token (negative = skip)
  query_start_loc int32 [S+1]  cumulative new-token counts
  seq_lens        int32 [S]    context length per sequence, new tokens included (they are the last q_len)
  block_tables    int32 [S, max_blocks_per_seq]
All kernels take explicit strides, so q / k / v / out may be strided views (e.g. slices of a fused qkv
projection) as long as the last dimension is contiguous. Softmax runs in the exp2 domain (scale * log2 e
folded into the logits) and always accumulates in fp32.

head_dim must be a power of two >= 16 (tl.arange / tl.dot shapes). Importing this module requires triton;
with TRITON_INTERPRET=1 set before this module is imported (triton binds kernels to its interpreter at @jit
time) the same kernels run on CPU tensors, which is how the tests exercise them.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# Read once, like @triton.jit does when the kernels below are defined, so the two always agree.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def _upcast_dot(dtype: torch.dtype) -> bool:
    # The interpreter does not support bf16 arithmetic: its tl.dot multiplies the raw uint16 bit patterns
    # (triton-lang/triton#11584, documented as unsupported). Feed it fp32 there; on a GPU bf16 stays bf16.
    return dtype == torch.bfloat16 and INTERPRETED


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as tf32 on tensor cores (~1e-3 error); keep them exact.
    # For fp16/bf16 the option is ignored by triton.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile(q: torch.Tensor) -> int:
    # Query/key tile length. Rows wider than 256 bytes (fp32 with head_dim 128) get 32-long tiles so the
    # double-buffered q/k/v tiles stay within the shared memory of smaller CUDA GPUs (~100 KB).
    return 32 if q.element_size() * q.shape[-1] > 256 else 64


def _check_layout(*tensors: torch.Tensor) -> None:
    head_dim = tensors[0].shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("last (head_dim) dimension must be contiguous")


# --------------------------------------------------------------------------------------------- store_kv


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kco, stride_kch,
    stride_vcb, stride_vco, stride_vch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program per token, copying all its kv heads at once.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_kv_heads)[:, None]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kco + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vco + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(kc.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new k/v [T, num_kv_heads, head_dim] into the paged caches at slot_mapping [T] (<0 = skip)."""
    T, num_kv_heads, head_dim = k.shape
    if T == 0:
        return
    _check_layout(k, v, k_cache, v_cache)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
    )


# --------------------------------------------------------------------------------------------- shared


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, n_valid, offs_d, kv_head,
                  stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                  BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """K and V of one kv head at logical key positions `offs_n` ([BLOCK_N, HEAD_DIM] each), found through
    the sequence's block table row. Gathering per key keeps BLOCK_N independent of the cache block size."""
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    off = offs_n % BLOCK_SIZE
    k = tl.load(k_cache_ptr + (blk * stride_kcb + off * stride_kco + kv_head * stride_kch)[:, None]
                + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + (blk * stride_vcb + off * stride_vco + kv_head * stride_vch)[:, None]
                + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One online-softmax step: fold the scores of the query rows against one K/V tile into the running
    max `m_i` (log2 domain), denominator `l_i` and unnormalised output `acc`."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------- prefill


# Mixed steps pass the prefill part as slices that start after the decodes, so these pointers' 16-byte
# alignment varies from step to step; specialising on it would compile a second variant mid-run.
# (The option exists since triton 3.2; older versions just compile that second variant.)
_UNALIGNED = (["qsl_ptr", "seq_lens_ptr", "bt_ptr"]
              if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters else None)


@triton.jit(do_not_specialize=["stride_bts"],
            **({"do_not_specialize_on_alignment": _UNALIGNED} if _UNALIGNED else {}))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kco, stride_kch,
    stride_vcb, stride_vco, stride_vch,
    stride_bts,
    num_queries_per_kv,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid = (cdiv(max_query_len, BLOCK_M), num_seqs, num_heads): one query tile of one head of one sequence.
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // num_queries_per_kv

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # grid is sized for the longest query; shorter ones exit early
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_before = seq_len - q_len  # cached prefix length; query i sits at position ctx_before + i

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < q_len
    q_pos = ctx_before + offs_m
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)

    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Causality bounds the keys this tile needs: up to the position of its last valid query.
    kv_end = tl.minimum(seq_len, ctx_before + (tile + 1) * BLOCK_M)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, n_valid, offs_d, kv_head,
                             stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                             BLOCK_SIZE, UPCAST)
        # Every row sees key 0 in the first tile, so m stays finite from then on (no inf - inf).
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PREC)

    acc = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_query_len: int, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of each sequence's new queries (q [T, H, D]) over its whole paged context.

    The new tokens' k/v must already be in the cache. Writes out [T, H, D] (rows of tokens beyond
    query_start_loc[-1] are left untouched) and returns it.
    """
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0 or max_query_len == 0:
        return out
    assert num_heads % num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"
    _check_layout(q, k_cache, v_cache, out)
    block_m = block_n = _tile(q)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        num_heads // num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dot(q.dtype),
        num_warps=4, num_stages=2,
    )
    return out


# --------------------------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["stride_bts"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    m_part_ptr, l_part_ptr, acc_part_ptr,  # [S, H, NUM_SPLITS] and [S, H, NUM_SPLITS, D]; unused if 1 split
    seq_lens_ptr, bt_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kco, stride_kch,
    stride_vcb, stride_vco, stride_vch,
    stride_bts,
    num_heads, num_queries_per_kv,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid = (num_seqs, num_kv_heads, NUM_SPLITS). All query heads sharing a kv head are processed together
    # as the rows of one tile, so each K/V tile is read once per group (decode is bandwidth bound) and the
    # score computation is a real matmul (BLOCK_H >= 16 satisfies tl.dot's minimum shape).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits cover contiguous, BLOCK_N-aligned key ranges; short contexts may leave trailing splits empty,
    # which then record m = -inf, l = 0, acc = 0 and drop out of the reduction.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    kv_end = tl.minimum(kv_start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_valid = offs_h < num_queries_per_kv
    heads = kv_head * num_queries_per_kv + offs_h
    tok = seq.to(tl.int64)  # decode: token index == sequence index
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_valid[:, None], other=0.0)

    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    for start_n in range(kv_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, n_valid, offs_d, kv_head,
                             stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                             BLOCK_SIZE, UPCAST)
        # The first key of every visited tile is valid, so m stays finite.
        m_i, l_i, acc = _attend_tile(q, k, v, n_valid[None, :], m_i, l_i, acc, qk_scale, DOT_PREC)

    if NUM_SPLITS == 1:
        # No reduction pass needed; an empty context (padding sequence) yields zeros, not 0/0.
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=h_valid[:, None])
    else:
        part = (seq * num_heads + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(m_part_ptr + part, m_i, mask=h_valid)
        tl.store(l_part_ptr + part, l_i, mask=h_valid)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_valid[:, None])


@triton.jit
def _decode_reduce_kernel(
    m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr,
    stride_ot, stride_oh, num_heads,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    # grid = (num_seqs, num_heads): merge the per-split online-softmax states (log2 domain).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < NUM_SPLITS
    base = (seq * num_heads + head).to(tl.int64) * NUM_SPLITS
    m = tl.load(m_part_ptr + base + offs_s, mask=s_valid, other=float("-inf"))
    l = tl.load(l_part_ptr + base + offs_s, mask=s_valid, other=0.0)
    acc = tl.load(acc_part_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_valid[:, None], other=0.0)
    m_max = tl.max(m, 0)
    # Empty splits have m = -inf; guard so they (and an all-empty padding sequence) weigh 0 instead of NaN.
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)))
    l_tot = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


# Below this many keys per split, the extra reduce pass and partial-state traffic cost more than they save.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


def choose_num_splits(max_seq_len: int, num_seqs: int, num_kv_heads: int, num_sms: int | None = None) -> int:
    """Flash-decoding split count: 1 for short contexts; otherwise enough splits to fill the GPU. Always a
    power of two: NUM_SPLITS is a compile-time constant, so at most five variants (1..16) exist, and the
    model runner compiles them all at start-up instead of inside a timed step."""
    by_len = max(1, min(MAX_SPLITS, max_seq_len // MIN_KEYS_PER_SPLIT))
    if by_len == 1:
        return 1
    if num_sms is None:
        num_sms = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                   if torch.cuda.is_available() else 108)
    # (seq, kv_head) programs already in flight; splitting only helps until ~2 waves of programs.
    base = max(1, num_seqs * num_kv_heads)
    by_occupancy = max(1, (2 * num_sms) // base)
    splits = max(1, min(by_len, by_occupancy))
    return 1 << (splits.bit_length() - 1)  # rounded down


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                           num_splits: int | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """Single-query attention (q [S, H, D], one new token per sequence, already stored) over the paged cache.

    num_splits=None picks it with choose_num_splits from max_seq_len (default: the block-table capacity,
    which needs no device sync). Sequences with seq_len 0 produce zeros. Returns out [S, H, D].
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return out
    assert num_heads % num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"
    _check_layout(q, k_cache, v_cache, out)
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(max_seq_len, num_seqs, num_kv_heads)
    num_splits = max(1, int(num_splits))

    if num_splits > 1:
        m_part = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:  # never touched by the kernel when NUM_SPLITS == 1
        m_part = l_part = acc_part = out

    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, m_part, l_part, acc_part, seq_lens, block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        num_heads, group,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=_tile(q),
        NUM_SPLITS=num_splits, DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dot(q.dtype),
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            m_part, l_part, acc_part, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
        )
    return out
