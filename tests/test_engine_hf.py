"""The engine against Hugging Face transformers on the same weights: greedy tokens must match
exactly, logprobs within 1e-4, whatever the batching, chunking, preemption or prefix caching."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MAX_TOKENS = 24


def mixed_prompts(seed=0, n=16, vocab=512):
    rng = random.Random(seed)
    lengths = [1, 300, 2, 17, 16, 32, 33, 150, 64, 5, 250, 100, 7, 48, 200, 90][:n]
    return [[rng.randrange(3, vocab) for _ in range(n_tok)] for n_tok in lengths]


def hf_greedy(path, prompts, max_tokens=MAX_TOKENS):
    """Each prompt alone (no padding), greedy, EOS ignored; returns tokens and per-step logprobs."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(p):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
            results.append((tokens, logprobs))
    return results


_hf_cache = {}


def reference(path, prompts):
    key = (str(path), tuple(map(tuple, prompts)))
    if key not in _hf_cache:
        _hf_cache[key] = hf_greedy(path, prompts)
    return _hf_cache[key]


def assert_no_leak(llm):
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_blocks - kv.num_free_blocks} KV blocks leaked"
    assert not llm.engine.has_work()


def check_against_hf(llm, path, prompts, logprobs=False):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2 if logprobs else None)
    outs = llm.generate(prompts, params)
    ref = reference(path, prompts)
    for i, (out, (tokens, ref_lp)) in enumerate(zip(outs, ref)):
        assert out.token_ids == tokens, f"prompt {i} (len {len(prompts[i])}) diverges from transformers"
        assert out.finish_reason == "length"
        if logprobs:
            for step, (mine, theirs) in enumerate(zip(out.logprobs, ref_lp)):
                assert abs(mine.logprob - theirs[tokens[step]].item()) < 1e-4
                top = theirs.topk(2)
                assert mine.top_ids[0] == top.indices[0].item()
                assert abs(mine.top_logprobs[1] - top.values[1].item()) < 1e-4
    assert_no_leak(llm)
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_models, arch):
    llm = LLM(str(tiny_models[arch]), dtype="float32", num_kv_blocks=512)
    check_against_hf(llm, tiny_models[arch], mixed_prompts(), logprobs=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_small_budget(tiny_models, arch):
    llm = LLM(str(tiny_models[arch]), dtype="float32", num_kv_blocks=512, max_num_batched_tokens=40)
    check_against_hf(llm, tiny_models[arch], mixed_prompts())


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_preemption_under_small_kv_pool(tiny_models, arch):
    # 16 sequences need ~1.7k tokens of KV at the end; 48 blocks of 16 hold 768.
    llm = LLM(str(tiny_models[arch]), dtype="float32", num_kv_blocks=48, max_num_batched_tokens=128)
    check_against_hf(llm, tiny_models[arch], mixed_prompts())
    assert llm.engine.scheduler.num_preemptions > 0


def test_shared_prefix_hits_prefix_cache(tiny_models):
    rng = random.Random(1)
    prefix = [rng.randrange(3, 512) for _ in range(100)]
    prompts = [prefix + [rng.randrange(3, 512) for _ in range(k)] for k in (1, 5, 16, 40)]
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=256)
    check_against_hf(llm, tiny_models["llama"], prompts[:1])  # fills the cache
    outs = check_against_hf(llm, tiny_models["llama"], prompts)
    assert all(o.num_cached_tokens >= 96 for o in outs)
    assert llm.engine.kv.num_prefix_hits > 0


def test_tied_embeddings(tmp_path):
    from conftest import build_tiny_model
    path = build_tiny_model("qwen2", tmp_path / "tied", tie=True)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=256)
    check_against_hf(llm, path, mixed_prompts(n=4))
