"""Structured outputs: the grammar backends on the batched path, and the engine with constrained
requests beside unconstrained ones.

  backends: for xgrammar and llguidance, the cold compile of a mid-size JSON schema and the time to
            fill the bitmask of 64 rows per step, on a 32k-token byte-level BPE vocabulary trained
            here on the Python standard library (no download; a real model's vocabulary is of this size).
  engine:   the offline engine (demo model by default): 64 json_schema requests against 64
            unconstrained ones in the same process, and how long a cold compile holds up other streams.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Mid-size: nested objects, arrays, enums, anyOf, a string format, numeric bounds, bounded strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["DE", "FR", "US"]}}, "required": ["zip", "country"],
            "additionalProperties": False},
        "contact": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "integer"}, {"type": "null"}]},
        "history": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "event": {"enum": ["joined", "left", "promoted"]}}, "required": ["year", "event"],
            "additionalProperties": False}},
    },
    "required": ["id", "name", "role", "active", "address", "contact"],
    "additionalProperties": False,
}


def bpe_tokenizer(vocab_size: int = 32000):
    """A byte-level BPE tokenizer trained on the standard library's sources, cached beside the demo model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.demo import demo_model_dir
    path = demo_model_dir().parent / f"bench-bpe-{vocab_size}"
    if not (path / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
        tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def bench_backends(args) -> str:
    import torch

    from engine.structured import make_backend
    tok = bpe_tokenizer()
    eos = frozenset([tok.eos_token_id])
    vocab = len(tok)
    schema = json.dumps(SCHEMA)
    rows = ["| backend | setup (tokenizer) | cold compile, mid-size schema | bitmask fill, 64 rows, per step "
            "(mean / p90) | accept 64 tokens |", "|---|---|---|---|---|"]
    for name in ("xgrammar", "guidance"):
        t0 = time.perf_counter()
        backend = make_backend(name, tok, vocab, eos)
        setup = time.perf_counter() - t0
        compiles = []
        for i in range(args.repeats):  # a fresh schema each time, so no cache helps
            variant = json.dumps({**SCHEMA, "title": f"v{i}"})
            t0 = time.perf_counter()
            compiled = backend.compile("json", variant)
            compiles.append(time.perf_counter() - t0)
        compiled = backend.compile("json", schema)
        matchers = [backend.matcher(compiled) for _ in range(64)]
        bitmask = torch.full((64, (vocab + 31) // 32), -1, dtype=torch.int32)
        shifts = torch.arange(32, dtype=torch.int32)
        rng = torch.Generator().manual_seed(0)
        fills, accepts = [], []
        for _ in range(args.steps):  # a random walk through the grammar, each row on its own path
            live = [m for m in matchers if not m.is_terminated()]
            if not live:
                break
            t0 = time.perf_counter()
            backend.fill_bitmask(live, bitmask[:len(live)])
            fills.append(time.perf_counter() - t0)
            allowed = ((bitmask[:len(live), :, None] >> shifts) & 1).reshape(len(live), -1)[:, :vocab]
            picks = torch.multinomial(allowed.float(), 1, generator=rng)[:, 0].tolist()
            t0 = time.perf_counter()
            ok = [m.accept(t) for m, t in zip(live, picks)]
            accepts.append(time.perf_counter() - t0)
            assert all(ok)
        fills_ms = sorted(1000 * f for f in fills)
        rows.append(f"| {name} | {setup:.2f} s | {1000 * statistics.median(compiles):.0f} ms (median of "
                    f"{args.repeats}) | {statistics.mean(fills_ms):.2f} / {fills_ms[int(0.9 * len(fills_ms))]:.2f} ms "
                    f"({len(fills)} steps) | {1000 * statistics.mean(accepts):.2f} ms |")
    return "\n".join(rows)


# Output of near-fixed length (~95 tokens on a one-byte-per-token vocabulary), so both groups decode
# the same number of steps at the same batch size.
SCHEMA_FIXED = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-f0-9]{16}$"},
        "name": {"type": "string", "minLength": 12, "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 6, "maxItems": 6},
        "level": {"type": "integer", "minimum": 100, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "tags", "level", "ok"],
    "additionalProperties": False,
}


def model_with_vocab(vocab: int) -> str:
    """The demo model's shapes with a `vocab`-token BPE vocabulary (random weights, --load-format dummy)."""
    from engine.demo import CONFIG, ensure_demo_model
    if vocab <= 260:
        return str(ensure_demo_model())
    tok = bpe_tokenizer(vocab)
    path = Path(tok.name_or_path).parent / f"bench-model-{vocab}"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
        config = {**CONFIG, "vocab_size": vocab, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": None}
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return str(path)


def bench_engine(args) -> str:
    from engine import LLM, SamplingParams
    from engine.messages import GenerateRequest, StructuredOutputs

    path = args.model or model_with_vocab(args.vocab)
    llm = LLM(path, load_format="dummy" if args.model is None else "auto",
              structured_outputs_backend=args.backend, max_num_seqs=256)
    engine, manager = llm.engine, llm.engine.structured
    grammar_s = [0.0]  # the manager's per-step work: bitmask fill (overlapping the forward), matcher advance
    for name in ("_fill", "advance"):
        def timed(*a, _f=getattr(manager, name)):
            t0 = time.perf_counter()
            try:
                return _f(*a)
            finally:
                grammar_s[0] += time.perf_counter() - t0
        setattr(manager, name, timed)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, min(vocab, 250)) for _ in range(32)] for _ in range(args.num_requests)]
    schema = StructuredOutputs(json=json.dumps(SCHEMA_FIXED))
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, structured_outputs=schema)] * 2)  # warm-up, compiles

    def run(params):
        grammar_s[0] = 0.0
        steps0 = engine.scheduler.num_steps
        t0, cpu0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        steps = engine.scheduler.num_steps - steps0
        tokens = sum(len(o.token_ids) for o in outs)
        return outs, tokens, elapsed, steps, cpu

    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, structured_outputs=schema)
                   for i in range(args.num_requests)]
    c_outs, c_tokens, c_time, c_steps, c_cpu = run(constrained)
    c_grammar = grammar_s[0]
    assert all(o.finish_reason == "stop" and json.loads(o.text) for o in c_outs)
    mean_len = round(c_tokens / len(c_outs))
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=mean_len, ignore_eos=True)
            for i in range(args.num_requests)]
    f_outs, f_tokens, f_time, f_steps, f_cpu = run(free)
    n = args.num_requests
    rows = [f"| {n} concurrent requests | output tokens | time | output tok/s | steps | ms/step | CPU ms/step "
            "(all threads) | grammar ms/step |", "|---|---|---|---|---|---|---|---|",
            f"| unconstrained (ignore_eos, {mean_len} tokens each) | {f_tokens} | {f_time:.2f} s | "
            f"{f_tokens / f_time:,.0f} | {f_steps} | {1000 * f_time / f_steps:.1f} | "
            f"{1000 * f_cpu / f_steps:.1f} | - |",
            f"| json_schema ({args.backend}) | {c_tokens} | {c_time:.2f} s | {c_tokens / c_time:,.0f} | {c_steps} | "
            f"{1000 * c_time / c_steps:.1f} | {1000 * c_cpu / c_steps:.1f} | {1000 * c_grammar / c_steps:.2f} |"]
    ratio = (c_tokens / c_time) / (f_tokens / f_time)

    # A cold compile while 64 unconstrained streams decode: step times around it.
    for i, p in enumerate(prompts):
        engine.add_request(GenerateRequest(f"bg{i}", p, SamplingParams(max_tokens=40, ignore_eos=True),
                                           time.monotonic()))
    steps, submitted, joined = [], None, None  # step durations
    cold = StructuredOutputs(json=json.dumps({**SCHEMA, "title": f"cold-{time.time()}"}))
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
        if len(steps) == 10:
            submitted = time.perf_counter()
            engine.add_request(GenerateRequest("cold", prompts[0], SamplingParams(max_tokens=8,
                                               structured_outputs=cold), time.monotonic()))
        if submitted and joined is None and "cold" in engine.scheduler.requests:
            joined, compile_s = len(steps), time.perf_counter() - submitted
    if joined is None:
        raise SystemExit("the other streams ended before the compile did: raise their max_tokens")
    during = steps[10:joined - 1]  # the steps that ran while the grammar compiled
    base = statistics.median(steps[3:10])
    extra = sum(d - base for d in during)
    rows += ["", f"Cold compile of the mid-size schema ({args.backend}) while {n} streams decode: the request "
             f"joined the batch {1000 * compile_s:.0f} ms and {joined - 10} step(s) after it arrived; the "
             f"{len(during)} step(s) run meanwhile took "
             f"{', '.join(f'{1000 * d:.0f}' for d in during)} ms against a median of {1000 * base:.0f} ms before, "
             f"{1000 * extra:+.0f} ms in all ({extra / base:+.2f} steps) for every other stream."]
    return "\n".join(rows) + f"\n\nconstrained/unconstrained throughput: {ratio:.2f}"


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backends")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--steps", type=int, default=60)
    b.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("engine")
    e.add_argument("--model", default=None)
    e.add_argument("--backend", default="auto")
    e.add_argument("--num-requests", type=int, default=64)
    e.add_argument("--max-tokens", type=int, default=200)
    e.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary of the benchmark model (260: demo)")
    e.add_argument("--threads", type=int, default=2)
    for sp in (b, e):
        sp.add_argument("--record", action="store_true", help="write the result into BENCHMARKS.md")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    result = bench_backends(args) if args.what == "backends" else bench_engine(args)
    print(result)
    if args.record:
        from benchmarks.record import record
        record(f"structured-outputs-{args.what}" + (f"-{args.backend}" if args.what == "engine" else ""),
               f"Structured outputs: {args.what}" + (f" ({args.backend})" if args.what == "engine" else ""), result)


if __name__ == "__main__":
    main()
