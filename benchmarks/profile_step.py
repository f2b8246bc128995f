"""Profile one decode step and one mixed step (decodes plus a prefill chunk) of the offline engine on CPU
with the torch profiler: where the step's time goes, and how many ops one decoder layer dispatches.

    python benchmarks/profile_step.py [--model DIR | --random-llama-100m] [--batch 64] [--threads 1]
        [--no-cpu-prepack-weights] [--attention-backend torch]

The op count per layer is deterministic (it does not depend on the machine's load); the times are only
meaningful on an otherwise idle machine. Ops are counted as the profiler sees them dispatched from
Python inside one decoder layer (`top-level`: what the host launches one by one) and including the ops
those call internally (`all`)."""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The step's stages, timed as profiler ranges: (object attribute path, method).
STAGES = (("engine.scheduler", "schedule"), ("engine.runner", "prepare"), ("engine.runner", "forward"),
          ("engine.runner", "sample_and_score"), ("engine.scheduler", "update"))
# Ops that only make a new view of a tensor (or convert to the dtype it has): no kernel runs.
VIEW_OPS = {"aten::view", "aten::reshape", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
            "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::split", "aten::split_with_sizes",
            "aten::unflatten", "aten::flatten", "aten::as_strided", "aten::alias", "aten::detach", "aten::narrow",
            "aten::unbind", "aten::empty", "aten::empty_like"}


def launches_kernel(e) -> bool:
    if e.name == "aten::to":
        return bool(e.cpu_children)  # a conversion to the dtype the tensor already has returns it as is
    return e.name not in VIEW_OPS


# Where a top-level op's time is counted.
CATEGORIES = (("matmul", ("addmm", "mm", "linear", "matmul", "bmm", "baddbmm")),
              ("attention", ("scaled_dot_product", "flash_attention", "paged_attention", "softmax")),
              ("kv store / gather", ("index_select", "index_copy", "gather", "index_put")),
              ("compiled regions", ("torch-compiled", "compiledfunction", "inductor")))


def wrap(obj, name: str, label: str) -> None:
    import torch
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    setattr(obj, name, timed)


def resolve(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def profile(llm, label: str, layer_label: str):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with torch.profiler.record_function("step"):
            llm.engine.step()
        wall = time.perf_counter() - start
    events = prof.events()
    layer_ranges = [e for e in events if e.name == layer_label]
    top = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == layer_label]

    def descendants(e):
        return sum(1 + descendants(c) for c in e.cpu_children)
    all_ops = sum(descendants(e) for e in layer_ranges)
    per_layer_kernels = sum(map(launches_kernel, top)) / max(len(layer_ranges), 1)
    per_layer_top = len(top) / max(len(layer_ranges), 1)
    per_layer_all = all_ops / max(len(layer_ranges), 1)
    names = collections.Counter(e.name for e in top)
    stage_ms = {s: sum(e.cpu_time_total for e in events if e.name == s) / 1000 for _, s in STAGES}
    # Categories over every op dispatched inside the forward (not nested in another op).
    # The profiled layer's own range is not an op: its ops are counted under it.
    fwd_ops = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name in (layer_label, "forward")
               and e.name != layer_label]
    cat_ms, op_ms = collections.Counter(), collections.Counter()
    for e in fwd_ops:
        lname = e.name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in lname for k in keys)), "other ops in the forward")
        cat_ms[cat] += e.cpu_time_total / 1000
        op_ms[e.name] += e.cpu_time_total / 1000
    print(f"\n== {label}: wall {1000 * wall:.1f} ms (under the profiler)")
    print(f"ops per decoder layer: {per_layer_kernels:.0f} that compute (not views), {per_layer_top:.0f} "
          f"top-level, {per_layer_all:.0f} in all")
    print("  " + ", ".join(f"{n} x{c}" for n, c in names.most_common()))
    print("stages (ms): " + ", ".join(f"{s} {ms:.1f}" for s, ms in stage_ms.items()))
    print("forward by kind (ms): " + ", ".join(f"{c} {ms:.1f}" for c, ms in cat_ms.most_common()))
    print("forward by op (ms): " + ", ".join(f"{n} {ms:.1f}" for n, ms in op_ms.most_common(12)))
    return per_layer_kernels, per_layer_top, per_layer_all


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--random-llama-100m", action="store_true",
                   help="the ~100M-parameter Llama-shaped random model of benchmarks/random_model.py")
    p.add_argument("--batch", type=int, default=64, help="sequences decoding in the profiled steps")
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu-prepack-weights", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attention-backend", default="auto", help="torch: the reference that gathers K/V")
    p.add_argument("--trace", default=None, help="write the decode step's chrome trace here")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from engine import LLM, SamplingParams
    model, load_format = args.model, "auto"
    if args.random_llama_100m:
        from benchmarks.random_model import ensure_random_model
        model, load_format = str(ensure_random_model()), "dummy"
    llm = LLM(model, dtype="float32", load_format=load_format, cpu_prepack_weights=args.cpu_prepack_weights,
              attention_backend=args.attention_backend)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    ids = iter(range(10**9))

    def add(n):
        from engine.messages import GenerateRequest
        for _ in range(n):
            prompt = [rng.randrange(vocab) for _ in range(args.input_len)]
            llm.engine.add_request(GenerateRequest(f"p{next(ids)}", prompt, params, time.monotonic()))

    add(args.batch)
    while llm.engine.scheduler.stats().num_waiting or any(  # until every sequence decodes
            r.num_output_tokens == 0 for r in llm.engine.scheduler.requests.values()):
        llm.engine.step()
    for _ in range(5):  # warm
        llm.engine.step()
    for path, name in STAGES:
        obj = resolve(llm, path)
        wrap(obj, name, name)
    layer = llm.engine.runner.model.layers[len(llm.engine.runner.model.layers) // 2]
    wrap(layer, "forward", "layer")
    decode = profile(llm, f"decode step, {args.batch} sequences", "layer")
    if args.trace:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.engine.step()
        prof.export_chrome_trace(args.trace)
    add(1)
    mixed = profile(llm, f"mixed step, {args.batch} decodes + a {args.input_len}-token prefill", "layer")
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        llm.engine.step()
    print(f"\nmean decode step without the profiler: {1000 * (time.perf_counter() - t0) / n:.1f} ms "
          f"({args.threads} thread(s))")
    return decode, mixed


if __name__ == "__main__":
    main()
