"""What the HTTP + IPC path costs: the same requests through the offline engine (`LLM.generate`)
and through `python -m server` (one worker) with the OpenAI SDK, streaming, all at once."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def offline(prompts, output_len: int) -> float:
    import torch

    from engine import LLM, SamplingParams
    from engine.worker import cpu_threads_per_worker
    torch.set_num_threads(cpu_threads_per_worker(1))  # as many threads as the server's one worker gets
    llm = LLM(None, max_num_batched_tokens=2048)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    return time.perf_counter() - start


def online(prompts, output_len: int) -> tuple[float, float]:
    from server_utils import ServerProcess
    server = ServerProcess("--workers", "1", "--max-num-batched-tokens", "2048")
    try:
        client = server.async_client()

        async def one(p):
            t0 = time.perf_counter()
            first = None
            stream = await client.completions.create(model="halffull-demo", prompt=p, max_tokens=output_len,
                                                     temperature=0.0, stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                first = first or time.perf_counter() - t0
            return first

        async def run():
            await one(prompts[0])  # warm-up
            start = time.perf_counter()
            ttfts = await asyncio.gather(*(one(p) for p in prompts))
            return time.perf_counter() - start, sum(ttfts) / len(ttfts)
        return asyncio.run(run())
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    from engine.worker import cpu_threads_per_worker
    t_off = offline(prompts, args.output_len)
    t_on, ttft = online(prompts, args.output_len)
    tokens = args.num_prompts * args.output_len
    table = (f"| path | time | output tok/s | mean TTFT |\n|---|---|---|---|\n"
             f"| offline `LLM.generate` | {t_off:.2f} s | {tokens / t_off:,.0f} | |\n"
             f"| server, 1 worker, streaming | {t_on:.2f} s | {tokens / t_on:,.0f} | {1000 * ttft:.0f} ms |\n\n"
             f"{args.num_prompts} concurrent requests of {args.input_len} prompt tokens and {args.output_len} "
             f"output tokens, demo model; both paths run the engine on "
             f"{cpu_threads_per_worker(1)} intra-op thread(s). The HTTP + IPC path adds {100 * (t_on / t_off - 1):.0f}% to the "
             f"offline time ({1000 * (t_on - t_off) / tokens:.2f} ms per output token).")
    print(table)
    if args.record:
        from benchmarks.record import record
        record("server-overhead", "Server overhead: HTTP + IPC against the offline engine", table)


if __name__ == "__main__":
    main()
