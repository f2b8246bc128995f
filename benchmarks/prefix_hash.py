"""What the prefix cache's sha256 block digests cost on a long prompt: a 32k-token request's first
admission (digests of every full block, all misses), caching its blocks, and a second request with the
same prompt (all hits, each checked against the block's tokens). Compared with keying by Python's
built-in `hash((parent, tokens))`, which the cache used before."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduling import KVBlockManager, Request  # noqa: E402


def builtin_hashes(tokens: list[int], block_size: int) -> list[int]:
    hashes: list[int] = []
    for i in range(len(tokens) // block_size):
        hashes.append(hash((hashes[-1] if hashes else None, tuple(tokens[i * block_size:(i + 1) * block_size]))))
    return hashes


def one_round(tokens: list[int], block_size: int) -> dict[str, float]:
    kv = KVBlockManager(len(tokens) // block_size + 8, block_size, hash_salt="benchmark")
    first = Request("a", tokens, max_tokens=1, arrival_time=0.0)
    t0 = time.perf_counter()
    kv.claim_cached_prefix(first)  # every digest computed, every lookup a miss
    t1 = time.perf_counter()
    kv.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    t2 = time.perf_counter()
    kv.cache_full_blocks(first)
    t3 = time.perf_counter()
    second = Request("b", tokens, max_tokens=1, arrival_time=0.0)
    kv.claim_cached_prefix(second)  # digests again, every lookup a hit, each checked
    t4 = time.perf_counter()
    builtin_hashes(tokens, block_size)
    t5 = time.perf_counter()
    assert second.num_computed_tokens == (len(tokens) - 1) // block_size * block_size
    return {"miss_admission": t1 - t0, "cache_blocks": t3 - t2, "hit_admission": t4 - t3, "builtin_hash": t5 - t4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rng = random.Random(0)
    tokens = [rng.randrange(0, 128256) for _ in range(args.tokens)]
    rounds = [one_round(tokens, args.block_size) for _ in range(args.repeats)]
    print(f"{args.tokens} tokens, block size {args.block_size}, {args.tokens // args.block_size} full blocks, "
          f"median of {args.repeats}:")
    for key in rounds[0]:
        print(f"  {key:15s} {statistics.median(r[key] for r in rounds) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
