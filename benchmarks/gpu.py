"""GPU benchmarks of the engine against the memory-bandwidth roofline, on a random-weight
Llama-3.1-8B-shaped bf16 model (no weights needed: `load_format="dummy"`).

    python benchmarks/gpu.py decode            # batch-1 decode tokens/s and fraction of the bound
    python benchmarks/gpu.py steps             # decode step time at B in {1,8,32,128,256}, L=1024
    python benchmarks/gpu.py azure --trace ../shared/traces/azure_llm_2023_conv.csv   # offline, vs transformers
    python benchmarks/gpu.py all --out out/gpu # all three, each table into its own file as it finishes

The bound's bandwidth is measured in this process (a device-to-device copy, bytes read plus written)
unless --bandwidth gives one. Every table names the GPU, the attention backend and whether CUDA graphs
ran, and the run stops if they are not what was asked for (on a GPU: a fast backend and graphs, unless
--enforce-eager). --tiny runs the same code on a tiny model, on CPU too: a dry run of the script, not a
measurement. --record writes the tables into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
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
TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2)
TITLES = {"decode": "GPU: batch-1 decode against the bandwidth bound",
          "steps": "GPU: decode step time against the bandwidth bound",
          "azure": "GPU: offline throughput on the Azure conversation trace"}


def model_config(args) -> dict:
    return TINY if args.tiny else LLAMA_8B


def model_dir(args) -> str:
    path = Path(tempfile.mkdtemp(prefix="llama8b-"))
    (path / "config.json").write_text(json.dumps(model_config(args)))
    return str(path)


def random_prompt(rng: random.Random, n: int, args) -> list[int]:
    """n distinct-looking tokens (one generator for the whole prompt: re-seeding per token repeats it)."""
    vocab = model_config(args)["vocab_size"]
    return [rng.randrange(min(1000, vocab // 2), min(100000, vocab)) for _ in range(n)]


def synchronize() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run, not a measurement)"


def measure_bandwidth(gib: float = 2.0) -> float:
    """Bytes read plus written per second by a device-to-device copy: the roofline's bandwidth."""
    import torch
    cuda = torch.cuda.is_available()
    n = int(gib * 2**30) if cuda else 64 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize()
    reps = 20 if cuda else 3
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize()
    return 2 * n * reps / (time.perf_counter() - start)


def bytes_per_step(llm) -> tuple[int, int]:
    """Weight bytes read by one decode step (embedding rows are only gathered) and KV bytes per token."""
    model = llm.engine.runner.model
    c = llm.engine.model_config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * c.dtype.itemsize
    return weights, kv_per_token


def make_llm(args, **kw):
    from engine import LLM
    return LLM(model_dir(args), load_format="dummy", max_model_len=args.max_model_len,
               attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, **kw)


def engine_state(llm, args) -> str:
    """What is being measured, printed, and checked against what was asked for."""
    runner = llm.engine.runner
    graphs = runner.graphs
    state = (f"{device_name()}, attention backend {runner.backend.name}, "
             + (f"CUDA graphs for decode batches {graphs.buckets[0]}..{graphs.buckets[-1]}" if graphs
                else "no CUDA graphs (eager)"))
    if runner.device.type == "cuda":
        import torch
        weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        kv = (runner.num_blocks + 1) * runner.block_bytes
        other = torch.cuda.memory_allocated(runner.device) - weights - kv
        # What the graphs, buffers and activations hold beyond weights and KV: with graphs captured under
        # autograd it was several GB (saved activations per bucket).
        state += f"; GPU memory beyond weights and KV cache: {other / 2**30:.2f} GiB"
    print(f"[gpu.py] measuring on {state}", flush=True)
    if runner.device.type == "cuda":
        if args.attention_backend != "auto":
            assert runner.backend.name == args.attention_backend, state
        assert runner.backend.name != "torch" or args.attention_backend == "torch", \
            f"fell back to the torch reference backend: {state}"
        assert (graphs is not None) == (not args.enforce_eager and runner.backend.supports_cuda_graphs), state
    return state


def decode(args) -> str:
    from engine import SamplingParams
    llm = make_llm(args)
    state = engine_state(llm, args)
    weights, kv = bytes_per_step(llm)
    rng = random.Random(0)
    prompt, warm = random_prompt(rng, args.input_len, args), random_prompt(rng, args.input_len, args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up outside the timing over the same lengths (every context, graph and kernel variant the timed
    # run meets), on another prompt so the timed run gets no prefix-cache hit.
    llm.generate([warm], params)
    synchronize()
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    synchronize()
    elapsed = time.perf_counter() - start
    assert out.num_cached_tokens == 0 and len(out.token_ids) == args.output_len
    tok_s = args.output_len / elapsed
    mean_ctx = args.input_len + args.output_len / 2
    bound = args.bandwidth / (weights + mean_ctx * kv)
    return (f"| batch | tokens/s | bound tokens/s | fraction of bound |\n|---|---|---|---|\n"
            f"| 1 | {tok_s:.1f} | {bound:.1f} | {tok_s / bound:.0%} |\n\n"
            f"{args.input_len}-token prompt, {args.output_len} output tokens, greedy, timed end to end (prefill "
            f"included); weights read per step {weights / 1e9:.2f} GB; bound = bandwidth / (weights + context KV), "
            f"bandwidth {args.bandwidth / 1e12:.2f} TB/s. {state}.")


def steps(args) -> str:
    from engine.messages import GenerateRequest, SamplingParams
    rows = ["| batch | context | step ms | bound ms | fraction of bound |", "|---|---|---|---|---|"]
    llm = make_llm(args, max_num_seqs=max(args.batches))
    state = engine_state(llm, args)
    engine = llm.engine
    weights, kv = bytes_per_step(llm)
    rng = random.Random(0)
    warm_steps, timed_steps = 3, args.timed_steps
    for b in args.batches:
        # Long enough that no request finishes before the timing ends, however long the prefill phase.
        params = SamplingParams(max_tokens=args.max_model_len - args.context, ignore_eos=True)
        for i in range(b):
            engine.add_request(GenerateRequest(f"b{b}-{i}", random_prompt(rng, args.context - 1, args), params,
                                               time.monotonic()))
        while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(warm_steps):
            engine.step()
        running = engine.scheduler.running
        assert len(running) == b and not any(r.is_prefilling for r in running), "not all rows decode"
        synchronize()
        start = time.perf_counter()
        for _ in range(timed_steps):
            outputs = engine.step()
            assert len(outputs) == b and all(len(o.new_token_ids) == 1 for o in outputs), "a row did not decode"
        synchronize()
        ms = 1000 * (time.perf_counter() - start) / timed_steps
        mean_ctx = args.context + warm_steps + timed_steps / 2
        bound = 1000 * (weights + b * mean_ctx * kv) / args.bandwidth
        rows.append(f"| {b} | {args.context} | {ms:.2f} | {bound:.2f} | {bound / ms:.0%} |")
        print(rows[-1], flush=True)
        for i in range(b):
            engine.abort(f"b{b}-{i}")
    return "\n".join(rows) + (f"\n\nEach step: the engine's whole step (schedule, inputs, forward, sampling), mean of "
                              f"{timed_steps} steps with all B rows decoding; bound = (weights + B × context KV) / "
                              f"bandwidth, bandwidth {args.bandwidth / 1e12:.2f} TB/s. {state}.")


def azure(args, write_partial) -> str:
    import torch

    from engine import SamplingParams
    rows = [line.split(",") for line in Path(args.trace).read_text().splitlines()[1:args.num_requests + 1]]
    lens = [(max(1, min(int(r[1]), args.max_model_len // 2)), max(1, min(int(r[2]), args.max_model_len // 2)))
            for r in rows]
    rng = random.Random(0)
    prompts = [random_prompt(rng, p, args) for p, _ in lens]
    outs = [o for _, o in lens]
    out_tokens, in_tokens = sum(outs), sum(p for p, _ in lens)
    llm = make_llm(args)
    state = engine_state(llm, args)
    llm.generate([random_prompt(rng, 64, args) for _ in range(8)], SamplingParams(max_tokens=16, ignore_eos=True))
    synchronize()
    start = time.perf_counter()
    results = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs])
    synchronize()
    ours = time.perf_counter() - start
    assert sum(len(r.token_ids) for r in results) == out_tokens
    del llm, results
    gc.collect()
    table = (f"| engine | time | output tok/s | total tok/s |\n|---|---|---|---|\n"
             f"| halffull | {ours:.1f} s | {out_tokens / ours:,.0f} | {(in_tokens + out_tokens) / ours:,.0f} |\n")
    note = f"\n{len(lens)} requests of the trace (prompt and output lengths from it, ignore_eos). halffull: {state}. "
    write_partial(table + note + "transformers: not run yet.")  # our row survives whatever follows
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated()
        assert left < 2**30, f"{left / 2**30:.1f} GiB still allocated after our engine: transformers would not get the GPU"
    try:
        hf, hf_note = hf_continuous_batching(prompts, outs, args)
    except Exception as e:  # noqa: BLE001 - its failure is a result to report, not a reason to lose ours
        return table + note + f"transformers continuous batching failed: {type(e).__name__}: {e}"
    table += f"| transformers continuous batching | {hf:.1f} s | {out_tokens / hf:,.0f} | {(in_tokens + out_tokens) / hf:,.0f} |\n"
    return table + note + f"halffull is {hf / ours:.1f}× faster. {hf_note}"


def hf_attention() -> str:
    """The paged SDPA attention of the installed transformers' continuous batching: `sdpa_paged` until
    4.x; 5.x takes plain `sdpa` and pages it itself (and switches to flash-attn when installed)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    for name in ("sdpa_paged", "paged|sdpa", "sdpa"):
        if name in ALL_ATTENTION_FUNCTIONS:
            return name
    raise RuntimeError(f"no SDPA attention among {sorted(ALL_ATTENTION_FUNCTIONS)}")


def hf_continuous_batching(prompts, outs, args) -> tuple[float, str]:
    """transformers' own continuous batching on the same random-weight model and the same requests, each
    with its own max_new_tokens; warmed up outside the timing; stopped at --hf-time-limit."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.generation import GenerationConfig
    cfg = model_config(args)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    attention = hf_attention()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention).eval()
    gen = GenerationConfig(max_new_tokens=max(outs), do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen)
    if hasattr(manager, "warmup"):
        manager.warmup()
    manager.start()
    try:
        def run(tag, batch, limit):
            ids = [manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=o)
                   for i, (p, o) in enumerate(batch)]
            done, deadline = {}, time.perf_counter() + limit
            while len(done) < len(ids) and time.perf_counter() < deadline:
                r = manager.get_result(timeout=1)
                if r is not None:
                    if getattr(r, "error", None):
                        raise RuntimeError(f"request {r.request_id}: {r.error}")
                    done[r.request_id] = len(r.generated_tokens)
            return done
        run("warm", [(p, 8) for p in prompts[:8]], 60)
        start = time.perf_counter()
        done = run("timed", list(zip(prompts, outs)), args.hf_time_limit)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=10)
    generated = sum(done.values())
    complete = len(done) == len(prompts)
    # Cut short: its throughput over the tokens it did generate, scaled to our count.
    seconds = elapsed * sum(outs) / max(generated, 1)
    note = (f"transformers {transformers.__version__}, attention `{model.config._attn_implementation}` "
            f"(asked for `{attention}`), each request its own max_new_tokens, warmed up outside the timing; "
            + ("all requests finished." if complete else
               f"stopped at the {args.hf_time_limit:.0f} s limit with {len(done)} of {len(prompts)} requests "
               f"finished ({generated} tokens): its time is scaled to our output token count."))
    return seconds, note


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["decode", "steps", "azure", "all"])
    p.add_argument("--bandwidth", type=float, default=None, help="B/s; default: measured in this process")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--timed-steps", type=int, default=10)
    p.add_argument("--trace", default="../shared/traces/azure_llm_2023_conv.csv")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--hf-time-limit", type=float, default=240.0)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of the script (CPU too)")
    p.add_argument("--out", default=None, help="directory: each table into gpu-<mode>.md as soon as it finishes")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    print(f"[gpu.py] {device_name()}", flush=True)
    if args.bandwidth is None:
        args.bandwidth = measure_bandwidth()
        print(f"[gpu.py] measured copy bandwidth {args.bandwidth / 1e12:.2f} TB/s", flush=True)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for mode in (["decode", "steps", "azure"] if args.mode == "all" else [args.mode]):
        def write(table: str, mode=mode) -> None:
            if out:
                (out / f"gpu-{mode}.md").write_text(f"## {TITLES[mode]}\n\n{device_name()}\n\n{table}\n")
        table = {"decode": decode, "steps": steps, "azure": lambda a: azure(a, write)}[mode](args)
        print(table, flush=True)
        write(table)
        if args.record and not args.tiny:
            from benchmarks.record import record
            record(f"gpu-{mode}", TITLES[mode], table)
        gc.collect()


if __name__ == "__main__":
    main()
