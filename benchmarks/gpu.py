"""GPU benchmarks of the engine against the memory-bandwidth roofline, on a random-weight
Llama-3.1-8B-shaped bf16 model (no weights needed: `load_format="dummy"`).

    python benchmarks/gpu.py decode            # batch-1 decode tokens/s and fraction of the bound
    python benchmarks/gpu.py steps             # decode step time at B in {1,8,32,128,256}, L=1024
    python benchmarks/gpu.py azure --trace ../shared/traces/azure_llm_2023_conv.csv   # offline, vs transformers
Add --record to write the table into BENCHMARKS.md. --bandwidth is the measured copy bandwidth
(default 3.0e12 B/s, an H100 80GB as measured here).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}


def model_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="llama8b-"))
    (path / "config.json").write_text(json.dumps(LLAMA_8B))
    return str(path)


def bytes_per_step(llm) -> tuple[int, int]:
    """Weight bytes read by one decode step (embedding rows are only gathered) and KV bytes per token."""
    model = llm.engine.runner.model
    c = llm.engine.model_config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * c.dtype.itemsize
    return weights, kv_per_token


def make_llm(args, **kw):
    from engine import LLM
    return LLM(model_dir(), load_format="dummy", max_model_len=args.max_model_len, **kw)


def decode(args) -> str:
    from engine import SamplingParams
    llm = make_llm(args)
    weights, kv = bytes_per_step(llm)
    prompt = [random.Random(0).randrange(1000, 100000) for _ in range(args.input_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    start = time.perf_counter()
    llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    tok_s = args.output_len / elapsed
    mean_ctx = args.input_len + args.output_len / 2
    bound = args.bandwidth / (weights + mean_ctx * kv)
    return (f"| batch | tokens/s | bound tokens/s | fraction of bound |\n|---|---|---|---|\n"
            f"| 1 | {tok_s:.1f} | {bound:.1f} | {tok_s / bound:.0%} |\n\n"
            f"{args.input_len}-token prompt, {args.output_len} output tokens, greedy; weights read per step "
            f"{weights / 1e9:.2f} GB; bound = bandwidth / (weights + context KV).")


def steps(args) -> str:
    import torch

    from engine.messages import GenerateRequest, SamplingParams
    rows = ["| batch | context | step ms | bound ms | fraction of bound |", "|---|---|---|---|---|"]
    llm = make_llm(args, max_num_seqs=max(args.batches))
    engine = llm.engine
    weights, kv = bytes_per_step(llm)
    rng = random.Random(0)
    for b in args.batches:
        for i in range(b):
            engine.add_request(GenerateRequest(f"b{b}-{i}", [rng.randrange(1000, 100000) for _ in range(args.context - 1)],
                                               SamplingParams(max_tokens=64, ignore_eos=True), time.monotonic()))
        while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        n = 10
        start = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / n
        bound = 1000 * (weights + b * (args.context + 8) * kv) / args.bandwidth
        rows.append(f"| {b} | {args.context} | {ms:.2f} | {bound:.2f} | {bound / ms:.0%} |")
        for i in range(b):
            engine.abort(f"b{b}-{i}")
    return "\n".join(rows) + "\n\nEach step: the engine's whole step (schedule, inputs, forward, sampling)."


def azure(args) -> str:
    import torch

    from engine import SamplingParams
    rows = [line.split(",") for line in Path(args.trace).read_text().splitlines()[1:args.num_requests + 1]]
    lens = [(min(int(r[1]), args.max_model_len // 2), max(1, min(int(r[2]), args.max_model_len // 2))) for r in rows]
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(p)] for p, _ in lens]
    out_tokens = sum(o for _, o in lens)
    in_tokens = sum(p for p, _ in lens)
    llm = make_llm(args)
    start = time.perf_counter()
    llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in lens])
    ours = time.perf_counter() - start
    del llm
    torch.cuda.empty_cache()
    table = (f"| engine | time | output tok/s | total tok/s |\n|---|---|---|---|\n"
             f"| halffull | {ours:.1f} s | {out_tokens / ours:,.0f} | {(in_tokens + out_tokens) / ours:,.0f} |\n")
    hf, note = hf_continuous_batching(prompts, lens)
    if hf is not None:
        table += f"| transformers continuous batching | {hf:.1f} s | {out_tokens / hf:,.0f} | {(in_tokens + out_tokens) / hf:,.0f} |\n"
        table += f"\nhalffull is {hf / ours:.1f}× faster. "
    return table + f"\n{len(lens)} requests of the trace (prompt and output lengths from it, ignore_eos). {note}"


def hf_continuous_batching(prompts, lens):
    """transformers' own continuous batching on the same random-weight model, same requests."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.generation import GenerationConfig
    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa_paged").eval()
    # One generation length for all: generate_batch takes a single config, so every request gets the
    # trace's mean output length and the token count is adjusted to what was generated.
    mean_out = round(sum(o for _, o in lens) / len(lens))
    gen = GenerationConfig(max_new_tokens=mean_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    # Scale its time to the same number of output tokens as ours.
    return elapsed * sum(o for _, o in lens) / max(generated, 1), (
        f"transformers' generate_batch takes one max_new_tokens ({mean_out}, the trace mean); its time is "
        f"scaled to our output token count ({generated} generated).")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["decode", "steps", "azure"])
    p.add_argument("--bandwidth", type=float, default=3.0e12)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--trace", default="../shared/traces/azure_llm_2023_conv.csv")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    table = {"decode": decode, "steps": steps, "azure": azure}[args.mode](args)
    print(table)
    if args.record:
        from benchmarks.record import record
        titles = {"decode": "GPU: batch-1 decode against the bandwidth bound",
                  "steps": "GPU: decode step time against the bandwidth bound",
                  "azure": "GPU: offline throughput on the Azure conversation trace"}
        record(f"gpu-{args.mode}", titles[args.mode], table)


if __name__ == "__main__":
    main()
