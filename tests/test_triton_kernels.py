"""Triton paged-attention kernels vs a dense torch reference: on CPU through the Triton interpreter, on
a CUDA GPU compiled (conftest sets TRITON_INTERPRET only where no GPU is present). The tests at the end
need the compiled kernels: they compare them with the torch reference backend at model-like shapes and
check that no kernel recompiles once the variants are warm."""

from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from engine.attention import triton_kernels as tk  # noqa: E402

# On CPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton: @triton.jit (triton's own
# helpers included) picks the interpreter at definition time. Without it, tl.sum, tl.max, ... are
# compiled-mode objects that run only on a GPU.
if tk.INTERPRETED and isinstance(triton.language.sum, InterpretedFunction):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA GPU and triton was imported before TRITON_INTERPRET=1 was set; run the tests with "
                "TRITON_INTERPRET=1", allow_module_level=True)
COMPILED = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: checks the compiled Triton kernels "
                                                       "(this run interprets them on CPU)")
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    """Random paged batch. Prefixes are written to the cache directly, new k/v are returned for store_kv.

    Blocks are handed out in a shuffled order, and every slot no sequence owns holds NaN, so reading
    outside a sequence's context (or an unmasked tail of a block) poisons the output.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    num_heads = num_kv_heads * group
    blocks_per_seq = [-(-L // block_size) for L in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is only ever padding
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = []
    for s, (L, ql) in enumerate(zip(seq_lens, q_lens)):
        blocks = [perm.pop() for _ in range(blocks_per_seq[s])]
        block_tables[s, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for pos in range(L):
            blk, off = blocks[pos // block_size], pos % block_size
            if pos < L - ql:  # cached prefix
                k_cache[blk, off] = rnd(num_kv_heads, head_dim)
                v_cache[blk, off] = rnd(num_kv_heads, head_dim)
            else:
                slots.append(blk * block_size + off)
    T = sum(q_lens)
    batch = dict(
        q=rnd(T, num_heads, head_dim), k=rnd(T, num_kv_heads, head_dim), v=rnd(T, num_kv_heads, head_dim),
        k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
    )
    batch = {name: t.to(DEVICE) for name, t in batch.items()}
    return dict(batch, max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def reference(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale):
    """Dense causal attention per sequence in float32, on the CPU; new queries are the last q_len context
    positions."""
    q, k_cache, v_cache, query_start_loc, seq_lens, block_tables = (
        t.cpu() for t in (q, k_cache, v_cache, query_start_loc, seq_lens, block_tables))
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for s in range(seq_lens.shape[0]):
        q0, q1, L = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(seq_lens[s])
        if q1 == q0:
            continue
        blocks = block_tables[s, :-(-L // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(group, dim=1)
        qs = q[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(q1 - q0) + (L - (q1 - q0))
        mask = torch.arange(L)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def run_prefill(b, scale):
    tk.store_kv(b["k"], b["v"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    out = torch.empty_like(b["q"])
    tk.paged_prefill_attention(b["q"], b["k_cache"], b["v_cache"], b["query_start_loc"], b["seq_lens"],
                               b["block_tables"], scale, b["max_query_len"], out)
    return out


def ref_of(b, scale):
    return reference(b["q"], b["k_cache"], b["v_cache"], b["query_start_loc"], b["seq_lens"],
                     b["block_tables"], scale)


# Combinations are spread across cases instead of taking the full product (the interpreter is slow).
@pytest.mark.parametrize("head_dim,group,block_size,dtype", [
    (64, 4, 16, torch.float32),
    (128, 1, 32, torch.bfloat16),
    (64, 8, 32, torch.float16),
    (128, 4, 16, torch.float32),
])
def test_prefill(head_dim, group, block_size, dtype):
    # fresh prompt, exact multiple of the block size, continuation of a cached prefix (longer than one query
    # tile), a single new token inside a prefill batch
    seq_lens = [37, 2 * block_size, 90, 33]
    q_lens = [37, 2 * block_size, 70, 1]
    b = make_batch(seq_lens, q_lens, 2, group, head_dim, block_size, dtype, seed=head_dim + group)
    scale = head_dim ** -0.5
    out = run_prefill(b, scale)
    torch.testing.assert_close(out.float().cpu(), ref_of(b, scale), **TOL[dtype])


@pytest.mark.parametrize("head_dim,group,block_size,dtype,num_splits", [
    (128, 8, 16, torch.float32, 1),
    (128, 8, 16, torch.float32, 3),
    (64, 4, 32, torch.bfloat16, 4),
    (64, 1, 16, torch.float16, 2),
])
def test_decode(head_dim, group, block_size, dtype, num_splits):
    # contexts of 1 token, exactly one block, a block multiple, and ragged lengths; with 3-4 splits the
    # shortest sequences leave some splits empty
    seq_lens = [1, block_size, 77, 3 * block_size, 100]
    b = make_batch(seq_lens, [1] * len(seq_lens), 2, group, head_dim, block_size, dtype, seed=num_splits)
    scale = head_dim ** -0.5
    tk.store_kv(b["k"], b["v"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    out = torch.empty_like(b["q"])
    tk.paged_decode_attention(b["q"], b["k_cache"], b["v_cache"], b["seq_lens"], b["block_tables"], scale, out,
                              num_splits=num_splits)
    torch.testing.assert_close(out.float().cpu(), ref_of(b, scale), **TOL[dtype])


def test_decode_padding_sequence_and_large_logits():
    # A padding sequence (seq_len 0, slot -1) must give zeros, not NaN, in both the direct and the split path.
    # Logits of several hundred overflow exp unless every split and the merge subtract their running max.
    b = make_batch([40, 1], [1, 1], 1, 2, 16, 16, torch.float32)
    b["q"] *= 100
    b["seq_lens"][1] = 0
    b["slot_mapping"][1] = -1
    tk.store_kv(b["k"], b["v"], b["k_cache"], b["v_cache"], b["slot_mapping"])
    for splits in (1, 2):
        out = torch.full_like(b["q"], float("nan"))
        tk.paged_decode_attention(b["q"], b["k_cache"], b["v_cache"], b["seq_lens"], b["block_tables"], 0.25,
                                  out, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1].cpu(), ref_of(b, 0.25)[:1], **TOL[torch.float32])


def test_store_kv_skips_negative_slots():
    num_blocks, bs, hkv, d = 4, 16, 3, 32  # non-power-of-two head count exercises the head mask
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(4, hkv, d).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(4, hkv, d).to(torch.bfloat16).to(DEVICE)
    slots = torch.tensor([5, -1, 2 * bs + 15, 3 * bs], dtype=torch.int64, device=DEVICE)
    tk.store_kv(k, v, k_cache, v_cache, slots)
    exp_k, exp_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            exp_k[slot // bs, slot % bs] = k[t]
            exp_v[slot // bs, slot % bs] = v[t]
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)


def test_backend_forward_prefill_mixed_decode_with_strided_qkv():
    torch.manual_seed(0)
    hkv, group, d, bs = 2, 2, 32, 16
    h, scale = hkv * group, d ** -0.5
    backend = TritonAttentionBackend()
    b = make_batch([20, 45], [20, 25], hkv, group, d, bs, torch.float32, seed=7)
    k_cache, v_cache, tables = b["k_cache"], b["v_cache"], b["block_tables"]

    def step(q_lens, seq_lens, slot_mapping, q, k, v, **flags):
        qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        meta = SimpleNamespace(slot_mapping=slot_mapping, query_start_loc=qsl, block_tables=tables,
                               seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                               max_query_len=max(q_lens), max_seq_len=max(seq_lens), **flags)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
        ref = reference(q, k_cache, v_cache, qsl, meta.seq_lens, tables, scale)
        torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])

    def appended(seq_lens, q_lens):  # slots, q, k, v for q_lens new tokens after each current context
        slots = [int(tables[s, p // bs]) * bs + p % bs
                 for s, (L, n) in enumerate(zip(seq_lens, q_lens)) for p in range(L, L + n)]
        T = len(slots)
        return tuple(t.to(DEVICE) for t in (torch.tensor(slots), torch.randn(T, h, d), torch.randn(T, hkv, d),
                                             torch.randn(T, hkv, d)))

    # Prefill (one fresh prompt, one continuing a cached prefix), with q/k/v as views of one fused
    # projection (non-contiguous token stride) as a model passes them.
    qkv = torch.cat([b["q"].flatten(1), b["k"].flatten(1), b["v"].flatten(1)], dim=1)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=1)
    step([20, 25], [20, 45], b["slot_mapping"], q.view(-1, h, d), k.view(-1, hkv, d), v.view(-1, hkv, d),
         is_decode=False)
    # Mixed step, decodes first: seq 0 decodes, seq 1 prefills 3 more tokens, filling its 3rd block exactly.
    step([1, 3], [21, 48], *appended([20, 45], [1, 3]), is_decode=False, num_decodes=1)
    # Pure decode step; seq 1 starts a newly allocated 4th block.
    used = set(tables.flatten().tolist())
    tables[1, 3] = next(i for i in range(1, k_cache.shape[0]) if i not in used)
    step([1, 1], [22, 49], *appended([21, 48], [1, 1]), is_decode=True)


def test_choose_num_splits():
    assert tk.choose_num_splits(100, 1, 8, num_sms=132) == 1  # short context: no split pass
    assert tk.choose_num_splits(8192, 1, 8, num_sms=132) == tk.MAX_SPLITS
    assert tk.choose_num_splits(8192, 256, 8, num_sms=132) == 1  # batch alone fills the GPU
    assert tk.choose_num_splits(2048, 4, 8, num_sms=132) == 8  # 33 by occupancy, 8 by length
    assert tk.choose_num_splits(4096, 3, 8, num_sms=132) == 8  # 11 by occupancy, rounded down to a power of two


# ---- compiled kernels on a GPU ---------------------------------------------------------------------------
def _meta(b, num_decodes):
    seq_lens = b["seq_lens"].tolist()
    qsl = b["query_start_loc"].tolist()
    return SimpleNamespace(slot_mapping=b["slot_mapping"], query_start_loc=b["query_start_loc"],
                           seq_lens=b["seq_lens"], block_tables=b["block_tables"], max_query_len=b["max_query_len"],
                           max_seq_len=b["max_seq_len"], num_decodes=num_decodes,
                           is_decode=num_decodes == len(seq_lens), seq_lens_host=seq_lens,
                           query_lens_host=[qsl[i + 1] - qsl[i] for i in range(len(seq_lens))])


@COMPILED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_backend_matches_torch_reference_backend(dtype):
    """A mixed step at Llama-3-8B attention shapes (32 heads over 8 KV heads, head_dim 128): six decodes with
    contexts from 1 to 4095 tokens (several split counts), a fresh prompt and a chunk over a cached prefix."""
    seq_lens = [1, 17, 1000, 2048, 3000, 4095, 300, 1029]
    q_lens = [1] * 6 + [300, 129]
    b = make_batch(seq_lens, q_lens, 8, 4, 128, 16, dtype, seed=11)
    b["k_cache"].nan_to_num_(0.0)  # the torch backend reads whole blocks; padding slots must not be NaN
    b["v_cache"].nan_to_num_(0.0)
    meta, scale = _meta(b, 6), 128 ** -0.5
    ours = TritonAttentionBackend().forward(b["q"], b["k"], b["v"], b["k_cache"], b["v_cache"], meta, scale)
    theirs = TorchAttentionBackend().forward(b["q"], b["k"], b["v"], b["k_cache"], b["v_cache"], meta, scale)
    torch.testing.assert_close(ours.float(), theirs.float(), **TOL[dtype])
    torch.testing.assert_close(ours.float().cpu(), ref_of(b, scale), **TOL[dtype])


def _num_compiled(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@COMPILED
def test_no_recompile_once_every_variant_is_warm():
    """Split counts are powers of two and the prefill kernel ignores the alignment of its sliced arguments,
    so after one pass over the variants no batch size, context length or decode/prefill mix compiles again."""
    def step(seq_lens, q_lens):
        b = make_batch(seq_lens, q_lens, 8, 4, 128, 16, torch.bfloat16, seed=len(seq_lens))
        nd = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
        TritonAttentionBackend().forward(b["q"], b["k"], b["v"], b["k_cache"], b["v_cache"], _meta(b, nd), 0.1)

    for length in (256, 512, 1024, 2048, 4096):  # what the model runner's warm-up runs
        step([length], [1])
    step([32], [32])
    step([64, 48], [1, 16])
    kernels = (tk._decode_kernel, tk._decode_reduce_kernel, tk._prefill_kernel, tk._store_kv_kernel)
    warm = [_num_compiled(k) for k in kernels]
    for seq_lens, q_lens in (([700, 3, 1500], [1, 1, 1]), ([5000] * 2, [1, 1]), ([9, 33, 20], [1, 1, 20]),
                             ([300, 40, 50, 77], [1, 1, 1, 30]), ([100] * 40, [1] * 40)):
        step(seq_lens, q_lens)
    assert [_num_compiled(k) for k in kernels] == warm
    assert all(tk.choose_num_splits(n, s, 8) in (1, 2, 4, 8, 16) for n in range(1, 9000, 97) for s in (1, 3, 64))
