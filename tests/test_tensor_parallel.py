"""Tensor parallelism on CPU over gloo: a TP=2 engine gives the same greedy tokens and logprobs as TP=1, through
chunked prefill, preemption and prefix-cache hits; KV heads split across ranks (or replicated when fewer than
ranks), a vocabulary that does not split evenly, a tied LM head; a dead rank fails its group fast."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import openai
import pytest

from conftest import build_tiny_model
from engine import LLM, SamplingParams
from server_utils import ServerProcess
from test_engine_hf import assert_no_leak, mixed_prompts

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def shared_prefix_prompts(vocab=512):
    rng = random.Random(1)
    prefix = [rng.randrange(3, vocab) for _ in range(100)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(k)] for k in (1, 5, 16, 40)]


def run(llm, prompts, prompt_logprobs: bool):
    """Greedy outputs with logprobs, and prompt logprobs on every other prompt if asked."""
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2,
                             prompt_logprobs=1 if i % 2 and prompt_logprobs else None) for i in range(len(prompts))]
    return llm.generate(prompts, params)


def assert_same(ref, got):
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert b.token_ids == a.token_ids, f"prompt {i}: TP=2 diverges from TP=1"
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert y.top_ids == x.top_ids and max(abs(p - q) for p, q in zip(x.top_logprobs, y.top_logprobs)) < 1e-4
        if a.prompt_logprobs is not None:
            for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
                assert abs(x.logprob - y.logprob) < 1e-4


def compare(path, batches, **engine_args):
    """Each batch of prompts through TP=1, then the same through TP=2 on one engine; returns the TP=2 engine.
    Prompt logprobs in the first batch only: the engine does not score prompt tokens it found in the cache."""
    tp1 = LLM(str(path), dtype="float32", **engine_args)
    ref = [run(tp1, prompts, i == 0) for i, prompts in enumerate(batches)]
    tp2 = LLM(str(path), dtype="float32", tensor_parallel_size=2, **engine_args)
    try:
        for i, (prompts, expected) in enumerate(zip(batches, ref)):
            assert_same(expected, run(tp2, prompts, i == 0))
        assert_no_leak(tp2)
    except BaseException:
        tp2.close()
        raise
    return tp2


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1(tiny_models, arch):
    # 48 blocks of 16 tokens hold 768 of the ~1.3k tokens the first batch needs: preemption. The shared-prefix
    # batch, after its first prompt alone, hits the prefix cache.
    shared = shared_prefix_prompts()
    llm = compare(tiny_models[arch], [mixed_prompts(n=12), shared[:1], shared], num_kv_blocks=48,
                  max_num_batched_tokens=128)
    try:
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv.num_prefix_hits > 0
        assert llm.engine.runner.kv_caches[0][0].shape[2] == 1  # each rank caches one of the two KV heads
    finally:
        llm.close()


def test_replicated_kv_head_uneven_vocab_tied_head(tmp_path):
    # One KV head for two ranks: both hold it. 511 tokens: rank 0 holds 256 rows of the vocabulary, rank 1 255.
    path = build_tiny_model("qwen2", tmp_path / "one-kv-head", vocab_size=511, tie=True, num_kv_heads=1)
    llm = compare(path, [mixed_prompts(n=8, vocab=511)], num_kv_blocks=256)
    try:
        assert llm.engine.runner.kv_caches[0][0].shape[2] == 1
        assert llm.engine.runner.model.embed_tokens.weight.shape[0] == 256
    finally:
        llm.close()


def test_unshardable_model_is_refused(tiny_models):
    with pytest.raises(ValueError, match="tensor parallel size 3 must divide the number of attention heads"):
        LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, tensor_parallel_size=3)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    llm.close()  # the refused one left no group behind


def test_dead_rank_fails_the_next_step(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 4
        child = llm.engine.runner.group.children[0]
        child.kill()
        child.wait()
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="rank 1 exited"):
            llm.generate([[5, 6, 7]], params)
    finally:
        llm.close()


def child_named(pid: int, name: str) -> int | None:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return next((int(p) for p in out if open(f"/proc/{p}/comm").read().strip() == name), None)


def test_server_rank_death_is_a_dead_worker():
    """Killing rank 1 of a TP=2 worker takes the worker down: its request in flight fails fast with a clear
    error, the server restarts the group, and it serves again."""
    server = ServerProcess("--tensor-parallel-size", "2", "--num-kv-blocks", "256", "--max-model-len", "4096")
    try:
        worker = child_named(server.proc.pid, "halffull-w0")
        rank1 = child_named(worker, "halffull-tp1")
        assert rank1 is not None, server.output()
        client = server.client(timeout=60)
        stream = client.completions.create(model="halffull-demo", prompt="long", max_tokens=3000, stream=True,
                                           temperature=0.0, extra_body={"ignore_eos": True})
        next(iter(stream))  # running
        os.kill(rank1, signal.SIGKILL)
        hit = time.monotonic()
        with pytest.raises(openai.APIError, match="died"):
            for _ in stream:
                pass
        assert time.monotonic() - hit < 5.0
        deadline = time.monotonic() + 90
        while child_named(server.proc.pid, "halffull-w0") in (None, worker) or server.metrics().get(
                "halffull:worker_up") != 1.0:
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(0.3)
        out = client.completions.create(model="halffull-demo", prompt="again", max_tokens=5, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        assert server.metrics()["halffull:worker_restarts_total"] == 1.0
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "Traceback" not in server.output()
