"""The CPU paths: weights packed once for oneDNN (the default) against the plain F.linear reference (both
token-exact with transformers), row counts padded to a few buckets, and intra-op threads chosen per step: all the
worker's threads for a step with enough matmul work per token, one fewer for a lighter one
(ModelRunner.step_threads)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_engine_hf import check_against_hf, mixed_prompts

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner
from engine.models.linear import Linear, bucket_rows, linear, pack


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from conftest import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("tied") / "llama", tie=True)


@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_and_reference_linear_match_transformers(tiny_models, tied_llama, tied, prepack):
    """The LM head packed in place (untied) or as a copy beside the embedding table it shares (tied)."""
    path = tied_llama if tied else tiny_models["llama"]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=512, cpu_prepack_weights=prepack)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * len(model.layers)
    assert all(m.weight.is_mkldnn == prepack for m in linears)
    assert (model.lm_head is None) == tied
    check_against_hf(llm, path, mixed_prompts(n=6), logprobs=True)


def test_packed_rows_are_padded_to_few_buckets():
    buckets = [bucket_rows(n) for n in range(1, 513)]
    assert all(n <= b < 1.0625 * n for n, b in zip(range(1, 513), buckets))
    assert buckets == sorted(buckets) and bucket_rows(512) == 512
    assert len(set(buckets)) == 96  # oneDNN kernels a server builds per weight shape, not 512
    weight = torch.randn(40, 24)
    packed = pack(weight)
    for n in (1, 33, 67, 100):  # padded (33 -> 34, 67 -> 68, 100 -> 104) and not: only the n rows come back
        x = torch.randn(n, 24)
        out = linear(x, packed)
        assert out.shape == (n, 40)
        torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)


def test_threads_follow_the_work_per_token(tiny_models, monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64)
        runner = llm.engine.runner
        assert runner.max_threads == 2
        used = []
        step_threads = ModelRunner.step_threads

        def recording(self, layout):
            used.append((layout.num_tokens, step_threads(self, layout)))
            return used[-1][1]
        monkeypatch.setattr(ModelRunner, "step_threads", recording)
        prompt, params = [list(range(3, 203))], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        llm.generate(prompt, params)
        assert used == [(200, 1), (1, 1), (1, 1)], "the default leaves a tiny model's server its core"
        # A threshold between the prefill's work per token (its matmuls, one LM-head row for 200 tokens)
        # and a decode's (matmuls and a whole LM-head row per token).
        per_token = (runner.flops_per_token + runner.flops_per_sample / 2) / 1e9
        runner.args = replace(runner.args, cpu_parallel_min_gflop_per_token=per_token)
        used.clear()
        out = llm.generate([list(range(4, 204))], params)  # another prompt: no prefix-cache hit
        assert len(out[0].token_ids) == 3
        assert used == [(200, 1), (1, 2), (1, 2)], "decodes have the work per token for both threads"
        assert torch.get_num_threads() == 2  # set for the last step
    finally:
        torch.set_num_threads(previous)
