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
        "email": {"type": "string", "format": "email", "maxLength": 24},
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
    e.add_argument("--max-tokens", type=int, default=160)
    e.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(bench_backends(args) if args.what == "backends" else bench_engine(args))


if __name__ == "__main__":
    main()
