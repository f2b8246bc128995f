"""Offline throughput of the engine (`LLM.generate`) on synthetic prompts; by default the demo
model on CPU. Writes its figures into BENCHMARKS.md with --record."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--scheduler", default="fcfs")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads, shared among the TP ranks")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--record", action="store_true", help="write the result into BENCHMARKS.md")
    args = p.parse_args()

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              scheduler=args.scheduler, load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    steps0 = llm.engine.scheduler.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    steps = llm.engine.scheduler.num_steps - steps0
    total = out_tokens + args.num_prompts * args.input_len
    c = llm.engine.model_config
    params_m = sum(p.numel() for p in llm.engine.runner.model.parameters()) / 1e6
    tp = args.tensor_parallel_size
    size = f"{params_m:.1f}M params" if tp == 1 else f"TP={tp}, {params_m:.1f}M params per rank"
    table = (f"| model | prompts × (in, out) | time | output tok/s | total tok/s | steps | ms/step |\n"
             f"|---|---|---|---|---|---|---|\n"
             f"| {c.architecture} {size}, {str(c.dtype).removeprefix('torch.')}, {llm.engine.runner.device} | "
             f"{args.num_prompts} × ({args.input_len}, {args.output_len}) | "
             f"{elapsed:.2f} s | {out_tokens / elapsed:,.0f} | {total / elapsed:,.0f} | {steps} | "
             f"{1000 * elapsed / steps:.1f} |")
    print(table)
    if args.record:
        from benchmarks.record import record
        record("offline-throughput", "Offline engine throughput", table)


if __name__ == "__main__":
    main()
