"""`--scheduler priority` on the real engine and through a real server: lower `priority` runs first
(vLLM's convention), and the least urgent running request is the one preempted."""

from __future__ import annotations

import asyncio

from engine import LLM, SamplingParams
from engine.messages import GenerateRequest
from server_utils import ServerProcess


def drive(llm: LLM, requests: list[GenerateRequest]) -> tuple[list[str], dict[str, int]]:
    """Submit all, step to the end; the order requests finished in and each one's preemptions."""
    for r in requests:
        llm.engine.add_request(r)
    finished, preemptions = [], {}
    while llm.engine.has_work():
        for out in llm.engine.step():
            if out.finish_reason is not None:
                finished.append(out.request_id)
                preemptions[out.request_id] = out.timings.num_preemptions
    return finished, preemptions


def request(rid: str, priority: int, arrival: float, prompt_len: int = 20, max_tokens: int = 8) -> GenerateRequest:
    prompt = [(7 * len(rid) + i) % 400 + 3 for i in range(prompt_len)]
    return GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0),
                           arrival, priority=priority)


def test_engine_runs_requests_in_priority_then_arrival_order(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", scheduler="priority", max_num_seqs=1)
    finished, _ = drive(llm, [request("low", 5, 0.0), request("first", 0, 1.0), request("urgent", -2, 3.0),
                              request("second", 0, 2.0)])
    assert finished == ["urgent", "first", "second", "low"]


def test_engine_preempts_the_least_urgent_running_request(tiny_models):
    # 6 blocks of 16 tokens: three 20-token prompts take 2 blocks each; growing to 60 tokens needs 4 each.
    llm = LLM(str(tiny_models["llama"]), dtype="float32", scheduler="priority", num_kv_blocks=6, block_size=16)
    requests = [request("a", 0, 0.0, max_tokens=40), request("b", 9, 1.0, max_tokens=40),
                request("c", 1, 2.0, max_tokens=40)]
    finished, preemptions = drive(llm, requests)
    assert finished[0] == "a" and preemptions["a"] == 0
    assert preemptions["b"] > 0  # the least urgent gives way first, though c is the newest
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_server_serves_the_more_urgent_waiting_request_first():
    server = ServerProcess("--scheduler", "priority", "--max-num-seqs", "1", "--max-model-len", "512")
    try:
        client = server.async_client()

        async def complete(priority: int, max_tokens: int) -> float:
            await client.completions.create(model="halffull-demo", prompt="Hello", max_tokens=max_tokens,
                                            temperature=0.0, extra_body={"ignore_eos": True, "priority": priority})
            return asyncio.get_running_loop().time()

        async def scenario():
            # A blocker holds the only seat; a low- and then a high-priority request queue behind it.
            stream = await client.completions.create(model="halffull-demo", prompt="Hi", max_tokens=200,
                                                     temperature=0.0, stream=True, extra_body={"ignore_eos": True})
            await anext(stream)  # the blocker is running
            low = asyncio.create_task(complete(10, 4))
            await asyncio.sleep(0.2)
            high = asyncio.create_task(complete(-1, 4))
            async for _ in stream:
                pass
            return await low, await high

        low_done, high_done = asyncio.run(scenario())
        assert high_done < low_done
    finally:
        assert server.stop() == 0, server.output()
