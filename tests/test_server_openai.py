"""The OpenAI-compatible API, through the official SDK against a real `python -m server`
(demo model, two CPU workers): once per engine-level scheduling policy (behind round-robin), once
per token-aware balancer (over FCFS), and once with each worker a tensor-parallel group of two ranks."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from scheduling import SCHEDULERS
from server_utils import ServerProcess

SCHEDULERS_UNDER_TEST = os.environ.get("HALFFULL_TEST_SCHEDULERS", ",".join(sorted(SCHEDULERS))).split(",")
# (scheduler, balancer, tensor-parallel size)
POLICIES = ([(s, "round-robin", 1) for s in SCHEDULERS_UNDER_TEST] + [("fcfs", "sal", 1), ("fcfs", "scls", 1)]
            + [("fcfs", "round-robin", 2)])
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module", params=POLICIES, ids=lambda p: f"{p[0]}+{p[1]}" + (f"+tp{p[2]}" if p[2] > 1 else ""))
def server(request):
    scheduler, balancer, tp = request.param
    s = ServerProcess("--workers", "2", "--scheduler", scheduler, "--balancer", balancer, "--num-kv-blocks", "512",
                      "--max-model-len", "1024", "--tensor-parallel-size", str(tp))
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture
def client(server):
    return server.client()


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if (m.get("halffull:num_requests_running") == 0 and m.get("halffull:num_requests_waiting") == 0
                and m.get("halffull:kv_cache_free_blocks") == m.get("halffull:kv_cache_total_blocks")):
            return m
        time.sleep(0.1)
    raise AssertionError(f"server did not return to idle: {m}")


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["halffull-demo"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_streaming_equals_non_streaming_completions(client):
    full = client.completions.create(model="halffull-demo", prompt="The capital of France", max_tokens=24, **GREEDY)
    chunks = list(client.completions.create(model="halffull-demo", prompt="The capital of France", max_tokens=24,
                                            stream=True, stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 24
    assert full.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_chat(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="halffull-demo", messages=messages, max_completion_tokens=20, **GREEDY)
    stream = client.chat.completions.create(model="halffull-demo", messages=messages, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert full.usage.completion_tokens == 20 == chunks[-1].usage.completion_tokens
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0


def test_usage_counts_match_tokenizer(server, client):
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "count these tokens"}).json()
    out = client.completions.create(model="halffull-demo", prompt="count these tokens", max_tokens=7, **GREEDY)
    assert out.usage.prompt_tokens == tok["count"] == len(tok["tokens"])
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == tok["count"] + 7
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "count these tokens"


def test_token_id_prompts_and_prompt_lists(client):
    one = client.completions.create(model="halffull-demo", prompt=[72, 105, 33], max_tokens=5, **GREEDY)
    many = client.completions.create(model="halffull-demo", prompt=[[72, 105, 33], [10, 11]], max_tokens=5, **GREEDY)
    assert len(many.choices) == 2 and many.choices[0].text == one.choices[0].text
    texts = client.completions.create(model="halffull-demo", prompt=["a", "b", "c"], max_tokens=3, **GREEDY)
    assert [c.index for c in texts.choices] == [0, 1, 2]


def test_n_and_seed(client):
    """usage counts every choice's tokens: shown to fail with `usage` (server/app.py) counting the first
    choice only."""
    kw = dict(model="halffull-demo", prompt="Once upon a time", max_tokens=16, temperature=1.0, n=3, seed=7,
              logprobs=0, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert [len(c.logprobs.tokens) for c in a.choices] == [16, 16, 16] and a.usage.completion_tokens == 48
    c = client.completions.create(**{**kw, "seed": 8})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_strings_cut_text(client):
    full = client.completions.create(model="halffull-demo", prompt="stop test", max_tokens=30, **GREEDY).choices[0].text
    stop = full[10:12]
    assert stop and stop in full
    cut = client.completions.create(model="halffull-demo", prompt="stop test", max_tokens=30, stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="halffull-demo", prompt="stop test", max_tokens=30, stop=stop,
                                         stream=True, **GREEDY)
    parts = list(streamed)
    assert "".join(p.choices[0].text for p in parts) == full[:full.index(stop)]
    assert parts[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    out = client.completions.create(model="halffull-demo", prompt="logprobs", max_tokens=6, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    # Keyed by token text, as OpenAI does; byte tokens that decode alike share a key.
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_echo_with_max_tokens_zero_scores_prompt(server, client):
    prompt = "score this prompt please"
    n = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["count"]
    out = client.completions.create(model="halffull-demo", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0.0)
    c = out.choices[0]
    assert c.text == prompt
    assert len(c.logprobs.token_logprobs) == n and c.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert out.usage.completion_tokens == 0


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="halffull-demo", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)


def test_vllm_extensions_accepted(client):
    out = client.completions.create(model="halffull-demo", prompt="ext", max_tokens=10, temperature=0.8, seed=1,
                                    extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                                "min_tokens": 10, "slo_tbt_ms": 200})
    assert out.usage.completion_tokens == 10
    greedy = client.completions.create(model="halffull-demo", prompt="ext", max_tokens=20, logprobs=0, **GREEDY)
    tokens = greedy.choices[0].logprobs.tokens
    # The demo tokenizer has one token per byte: an ASCII character's id is its code.
    position, char = next((i, t) for i, t in enumerate(tokens) if len(t) == 1 and t.isascii())
    stopped = client.completions.create(model="halffull-demo", prompt="ext", max_tokens=20, temperature=0.0,
                                        extra_body={"stop_token_ids": [ord(char)]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == position + 1


@pytest.mark.parametrize("kwargs, status", [
    (dict(temperature=-1.0), 400), (dict(top_p=0.0), 400), (dict(max_tokens=-2), 400), (dict(n=0), 400),
    (dict(max_tokens=5000), 400), (dict(suffix="tail"), 400), (dict(logprobs=50), 400),
    (dict(model="no-such-model"), 404), (dict(prompt=[999999]), 400), (dict(prompt=""), 400),
])
def test_error_statuses(client, kwargs, status):
    args = dict(model="halffull-demo", prompt="x", max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status
    body = e.value.response.json()["error"]
    assert body["message"] and "type" in body and "param" in body and "code" in body


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="halffull-demo", prompt="x" * 1100, max_tokens=1)


def test_malformed_json_and_wrong_types(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": "nope"})
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_concurrent_streams_over_two_workers(server):
    before = server.metrics()

    async def main():
        client = server.async_client()

        async def one(i):
            stream = await client.completions.create(model="halffull-demo", prompt=f"request {i} " * (1 + i % 7),
                                                     max_tokens=8 + i % 9, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY)
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            return usage.completion_tokens, 8 + i % 9
        return await asyncio.gather(*(one(i) for i in range(64)))
    results = asyncio.run(main())
    assert all(got == want for got, want in results)
    after = wait_idle(server)
    per_worker = httpx.get(server.url + "/metrics").text
    received = [float(l.rsplit(" ", 1)[1]) for l in per_worker.splitlines()
                if l.startswith("halffull:worker_requests_total{")]
    assert len(received) == 2 and all(r > 0 for r in received)
    assert after["halffull:worker_requests_total"] - before.get("halffull:worker_requests_total", 0) == 64


def test_client_disconnect_aborts_request(server):
    client = server.client()
    stream = client.completions.create(model="halffull-demo", prompt="long one", max_tokens=900, stream=True,
                                       **GREEDY)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    m = wait_idle(server)
    assert m["halffull:num_requests_running"] == 0
