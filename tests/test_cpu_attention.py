"""The C++ CPU paged-attention kernel (engine/attention/cpu_backend.py) against the torch reference backend
on random paged caches: decodes and prefill chunks with and without cached context, GQA, head sizes of
the test and demo models, contexts that end on and beside block boundaries, a block table wider than any
sequence needs. Both backends store the new K/V first; the caches they leave must match too. The engine
tests (test_engine_hf.py, test_cpu_paths.py) run the same kernel end to end: it is `auto` on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM
from engine.attention import AttentionMetadata, make_backend
from engine.attention.cpu_backend import CpuAttentionBackend
from engine.attention.torch_backend import TorchAttentionBackend


def scenario(rng, query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype):
    """q/k/v of the new tokens (q and k strided views of one tensor, as the model passes them), caches with
    random old contents, and the step's metadata over randomly placed blocks."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 2, dtype=torch.int32)
    slots, used = [], 0
    for i, (q_len, n) in enumerate(zip(query_lens, seq_lens)):
        row = ids[used:used + blocks_per_seq[i]]
        used += len(row)
        tables[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(n - q_len, n)]
    tokens = sum(query_lens)
    qk = torch.randn(tokens, heads + kv_heads, head_dim).to(dtype)
    q, k = qk.split([heads, kv_heads], dim=1)
    v = torch.randn(tokens, 2 * kv_heads, head_dim).to(dtype)[:, kv_heads:]
    cache = [torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2)]
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), num_decodes=num_decodes,
        query_lens_host=list(query_lens), seq_lens_host=list(seq_lens))
    return q, k, v, cache, meta


def run_both(q, k, v, cache, meta, scale):
    kernel_cache = [c.clone() for c in cache]
    out = CpuAttentionBackend().forward(q, k, v, *kernel_cache, meta, scale)
    # The reference in float32 on the same (possibly bf16) values.
    ref_cache = [c.float() for c in cache]
    ref = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), *ref_cache, meta, scale)
    return out, ref, kernel_cache, ref_cache


# (query_lens, seq_lens): decodes first, then prefill chunks (seq_len > q_len: cached context).
CASES = {
    "decodes": ([1] * 7, [1, 15, 16, 17, 32, 33, 150]),
    "prefill": ([1, 1, 5, 16, 33], [9, 40, 5, 16, 33]),
    "prefill-with-context": ([1, 7, 20, 1], [64, 30, 100, 3]),  # a decode after a prefill, as the runner orders
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (12, 4, 64), (8, 1, 128), (4, 4, 32)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_matches_torch_reference(case, heads, kv_heads, head_dim, block_size):
    rng = random.Random(f"{case}{heads}{head_dim}{block_size}")
    torch.manual_seed(rng.randrange(2**31))
    query_lens, seq_lens = CASES[case]
    q, k, v, cache, meta = scenario(rng, query_lens, seq_lens, heads, kv_heads, head_dim, block_size,
                                    torch.float32)
    out, ref, kernel_cache, ref_cache = run_both(q, k, v, cache, meta, head_dim ** -0.5)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(kernel_cache, ref_cache):
        assert torch.equal(got, want)


def test_bfloat16_against_float32_reference():
    rng = random.Random(1)
    q, k, v, cache, meta = scenario(rng, *CASES["prefill-with-context"], 12, 4, 64, 16, torch.bfloat16)
    out, ref, kernel_cache, ref_cache = run_both(q, k, v, cache, meta, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output
    for got, want in zip(kernel_cache, ref_cache):
        assert torch.equal(got.float(), want)


def test_auto_picks_the_kernel_on_cpu_and_rejects_bad_input():
    assert make_backend("auto", torch.device("cpu")).name == "cpu"
    assert (torch.tensor([1e-40]) * 2).item() > 0, "loading the kernel turned on flush-to-zero"
    rng = random.Random(2)
    q, k, v, cache, meta = scenario(rng, [1, 1], [3, 4], 4, 2, 48, 16, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim 48"):
        CpuAttentionBackend().forward(q, k, v, *cache, meta, 0.1)
    q, k, v, cache, meta = scenario(rng, [1, 1], [3, 4], 4, 2, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="one dtype"):
        CpuAttentionBackend().forward(q.double(), k, v, *cache, meta, 0.1)


def test_threads_split_the_work_without_changing_it():
    """Work items are (token, KV head), each computed whole by one thread: 1 or 2 threads, same bits."""
    rng = random.Random(3)
    q, k, v, cache, meta = scenario(rng, *CASES["prefill-with-context"], 12, 4, 64, 16, torch.float32)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(CpuAttentionBackend().forward(q, k, v, *[c.clone() for c in cache], meta, 0.125))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(*outs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_both_backends_match_transformers(tiny_models, backend):
    """End to end, logprobs included: the kernel (which the other engine tests run as `auto`) and the torch
    reference it falls back to, with chunked prefills so that chunks attend to cached context."""
    from test_engine_hf import check_against_hf, mixed_prompts
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", num_kv_blocks=256, attention_backend=backend,
              max_num_batched_tokens=64)
    assert llm.engine.runner.backend.name == backend
    check_against_hf(llm, tiny_models["qwen3"], mixed_prompts(n=8), logprobs=True)


def test_auto_falls_back_to_the_reference_when_the_kernel_does_not_build(monkeypatch, caplog):
    from engine.attention import cpu_backend

    def broken():
        raise RuntimeError("Error building extension 'halffull_cpu_attention'")
    monkeypatch.setattr(cpu_backend, "load_kernel", broken)
    assert make_backend("auto", torch.device("cpu")).name == "torch"
    assert "cpu attention kernel is unavailable" in caplog.text and "Error building extension" in caplog.text
    with pytest.raises(RuntimeError):
        make_backend("cpu", torch.device("cpu"))  # asked for by name: no silent substitute
