"""Engine behaviour beyond exactness: sampling, stops, aborts, bad input, no KV leaks."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from engine import LLM, SamplingParams
from engine.messages import GenerateRequest


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=256)


@pytest.fixture(autouse=True)
def no_leak(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        assert not engine.has_work()


PROMPT = [5, 9, 33, 101, 7, 8, 250]


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], p)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True)
    batched = llm.generate([[3, 4] * 40, PROMPT, [11] * 5], [others, p, others])[1].token_ids
    assert alone == batched
    different_seed = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20,
                                                          seed=99, ignore_eos=True))[0].token_ids
    assert different_seed != alone


def test_unseeded_sampling_varies_and_top_k_1_is_greedy(llm):
    runs = {tuple(llm.generate([PROMPT], SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True))[0].token_ids)
            for _ in range(4)}
    assert len(runs) > 1
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    top1 = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True))[0].token_ids
    tiny_p = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True))[0].token_ids
    assert greedy == top1 == tiny_p


def test_each_penalty_breaks_a_greedy_loop(llm):
    """Shown to fail with each penalty switched off in `apply_penalties` (engine/sampler.py) in turn: the
    repetition penalty's branch skipped, the frequency/presence branch skipped, the presence term dropped."""
    rng = random.Random(0)
    candidates = [[rng.randrange(3, 512) for _ in range(8)] for _ in range(32)]
    plain = llm.generate(candidates, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    # From some prompts the tiny random model falls into a loop: there a penalty must change the output.
    looping = [(prompt, out.token_ids) for prompt, out in zip(candidates, plain)
               if len(set(out.token_ids)) < len(out.token_ids)]
    assert len(looping) >= 2, "too few looping prompts: the test would prove nothing"
    for prompt, loop in looping[:2]:
        for penalty in (dict(repetition_penalty=50.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                        **penalty))[0].token_ids
            assert out != loop and len(set(out)) == len(out), penalty
            if "repetition_penalty" in penalty:  # it also counts the prompt's tokens (as vLLM does)
                assert not set(out) & set(prompt)


def test_stop_token_ids_min_tokens_and_eos(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].token_ids
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop"
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_at],
                                                min_tokens=first + 1))[0]
    assert len(out.token_ids) > first + 1 and stop_at not in out.token_ids[:first + 1]


def test_max_tokens_zero_scores_prompt(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    assert all(e.logprob <= 0 for e in out.prompt_logprobs[1:])


def test_prompt_logprobs_match_generation_logprobs(llm):
    """Scoring prompt + generated text must give the logprobs generation reported."""
    gen = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0))[0]
    scored = llm.generate([PROMPT + gen.token_ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    for mine, ref in zip(scored.prompt_logprobs[len(PROMPT):], gen.logprobs):
        assert abs(mine.logprob - ref.logprob) < 1e-4


def test_prompt_logprobs_of_a_cached_prompt_score_every_position(llm):
    """A prompt whose blocks are in the prefix cache is still scored at every position: with prompt
    logprobs it computes its whole prompt. (Before, the first chunk started past the cached blocks and
    the engine raised KeyError, killing the worker.)"""
    prompt = [(7 * i + 3) % 500 for i in range(70)]  # four full blocks of 16 to cache
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt], params)[0]
    cached = llm.generate([prompt], SamplingParams(max_tokens=1))[0]
    assert cached.num_cached_tokens > 0  # the cache does hold the prompt
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == len(prompt)
    for mine, ref in zip(again.prompt_logprobs[1:], first.prompt_logprobs[1:]):
        assert abs(mine.logprob - ref.logprob) < 1e-5


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    for i in range(6):
        engine.add_request(GenerateRequest(f"a{i}", [7 + i] * (20 + 30 * i),
                                           SamplingParams(max_tokens=50, ignore_eos=True), time.monotonic()))
    for _ in range(5):
        engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    for i in range(6):
        assert engine.abort(f"a{i}").finish_reason == "abort"
    assert engine.abort("a0") is None  # already gone


@pytest.mark.parametrize("prompt, params, message", [
    ([1] * 1024, SamplingParams(), "maximum context length"),
    ([], SamplingParams(), "empty"),
    ([1, 2], SamplingParams(max_tokens=-1), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 99999], SamplingParams(), "token ids"),
])
def test_bad_input_raises_and_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7], prompt], params)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_unknown_architecture_and_missing_weights(tmp_path, tiny_models):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        LLM(str(bad))
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_models["llama"], noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(noweights))


def test_text_prompts_and_stop_strings_with_demo_model():
    llm = LLM(None, num_kv_blocks=128)
    out = llm.generate("hello there", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    assert out.text and len(out.token_ids) == 20
    stop = out.text[5:8]
    cut = llm.generate("hello there", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[:out.text.index(stop)]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_engine_leaves_the_callers_arguments_alone(tiny_models):
    """Shown to fail with EngineCore setting the default batch budget on the caller's EngineArgs again."""
    from engine.config import EngineArgs
    from engine.engine_core import EngineCore
    args = EngineArgs(dtype="float32", num_kv_blocks=16)
    before = dataclasses.replace(args)
    engine = EngineCore(str(tiny_models["llama"]), args)
    assert args == before and engine.args.max_num_batched_tokens == 512  # the CPU default, on its own copy
