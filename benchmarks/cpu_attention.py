"""One layer's attention on CPU, KV store included: the C++ paged kernel (`cpu` backend) against the torch
reference (`torch`: gathers each sequence's blocks into a padded copy, then SDPA), at the shapes of the demo
model and the ~100M model, in alternating rounds, one thread.

    python benchmarks/cpu_attention.py [--rounds 5]

Times are the calling thread's CPU time (time.thread_time), which a busy machine inflates less than wall
time; each round reports the best of 10 calls. Blocks are placed at random in the pool, as a running
server's are."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (heads, kv heads, head_dim, query lengths, context lengths)
SHAPES = {
    "demo, decode of 64 at 176": (4, 2, 64, [1] * 64, [176] * 64),
    "~100M, decode of 32 at 150": (12, 4, 64, [1] * 32, [150] * 32),
    "~100M, 100-token prefill": (12, 4, 64, [100], [100]),
    "~100M, 512-token chunk after 512": (12, 4, 64, [512], [1024]),
}


def step_inputs(heads, kv_heads, head_dim, query_lens, seq_lens, block_size=16):
    import torch
    from engine.attention import AttentionMetadata
    blocks = [-(-n // block_size) for n in seq_lens]
    ids = torch.randperm(sum(blocks), dtype=torch.int32).split(blocks)
    tables = torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True)
    slots = [ids[i][p // block_size].item() * block_size + p % block_size
             for i, (q, n) in enumerate(zip(query_lens, seq_lens)) for p in range(n - q, n)]
    tokens = sum(query_lens)
    qk = torch.randn(tokens, heads + kv_heads, head_dim)
    q, k = qk.split([heads, kv_heads], dim=1)  # views of one tensor, as the model passes them
    v = torch.randn(tokens, kv_heads, head_dim)
    caches = [torch.randn(sum(blocks), block_size, kv_heads, head_dim) for _ in range(2)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0).to(torch.int32), block_tables=tables,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        num_decodes=sum(q == 1 for q in query_lens), query_lens_host=query_lens, seq_lens_host=seq_lens)
    return q, k, v, caches, meta


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import torch
    from engine.attention.cpu_backend import CpuAttentionBackend
    from engine.attention.torch_backend import TorchAttentionBackend
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    backends = {"torch": TorchAttentionBackend(), "cpu": CpuAttentionBackend()}
    for name, (heads, kv_heads, head_dim, query_lens, seq_lens) in SHAPES.items():
        q, k, v, caches, meta = step_inputs(heads, kv_heads, head_dim, query_lens, seq_lens)
        times = {b: [] for b in backends}
        for _ in range(args.rounds):
            for b, backend in backends.items():
                backend.forward(q, k, v, *caches, meta, head_dim ** -0.5)
                best = float("inf")
                for _ in range(10):
                    start = time.thread_time()
                    backend.forward(q, k, v, *caches, meta, head_dim ** -0.5)
                    best = min(best, time.thread_time() - start)
                times[b].append(1000 * best)
        print(f"{name}: " + "; ".join(f"{b} {min(t):.2f}-{max(t):.2f} ms" for b, t in times.items())
              + f" per layer ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
