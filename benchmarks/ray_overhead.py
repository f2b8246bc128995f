"""What a worker on Ray costs against a local one on the same machine: one worker either way (demo model), the
same loadgen run (all requests at once, at most `--max-concurrency` streams), local and Ray runs alternating.
The Ray worker's actor runs on a one-node cluster started here as the tests start theirs (tests/ray_cluster.py:
every packet on the loopback), so the difference is the Ray path itself: one actor call per engine step,
pickled over loopback gRPC, and the proxy process beside the engine.

On CPU the actor computes on one intra-op thread (the one CPU it holds); a local worker on a 2-core machine
also steps on one (it leaves the other core to the server), so on 2 cores both engines compute alike.

    python benchmarks/ray_overhead.py [--record]     # 256 requests x 100 prompt / 64 output tokens, 64 streams
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(kind: str, address: str, args, out: Path) -> dict:
    from loadgen.report import load_results
    from server_utils import ServerProcess
    flags = ["--workers", "1", "--num-kv-blocks", str(args.num_kv_blocks)]
    if kind == "Ray actor":
        flags += ["--data-parallel-backend", "ray", "--ray-address", address]
    server = ServerProcess(*flags, timeout=300)
    try:
        subprocess.run([sys.executable, "-m", "loadgen", "--base-url", server.url + "/v1", "--workload", "synthetic",
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                        "--length-dist", "fixed", "--num-requests", str(args.num_requests), "--rate", "inf",
                        "--max-concurrency", str(args.max_concurrency), "--warmup", "4", "--output", str(out)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    finally:
        server.stop()
    return load_results(out)["summary"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    from ray_cluster import LOOPBACK_ENV, RayCluster
    os.environ.update(LOOPBACK_ENV)
    cluster = RayCluster()
    rows = []
    try:
        cluster.start("head", head=True)
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for kind in ("local", "Ray actor"):
                    s = run(kind, cluster.address, args, Path(tmp) / f"{kind}-{i}")
                    rows.append(f"| {kind} | {s['output_throughput']:,.0f} | {s['mean_ttft_ms']:,.0f} ms | "
                                f"{s['median_ttft_ms']:,.0f} ms | {s['p99_ttft_ms']:,.0f} ms | "
                                f"{s['mean_tpot_ms']:,.1f} ms | {s['failed']} |")
                    print(rows[-1], flush=True)
    finally:
        cluster.stop()
    table = ("| worker | output tok/s | mean TTFT | median TTFT | p99 TTFT | mean TPOT | failed |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
             f"One worker, demo model, `--num-kv-blocks {args.num_kv_blocks}`: local (`python -m server --workers 1`) "
             "or an actor on a one-node Ray cluster on the same machine (the same with `--data-parallel-backend ray "
             f"--ray-address ADDR`), under loadgen with {args.num_requests} requests of {args.input_len} prompt and "
             f"{args.output_len} output tokens (ignore_eos), all sent at once, at most {args.max_concurrency} "
             "streams; runs in the order listed.")
    print(table)
    if args.record:
        from benchmarks.record import record
        record("ray-overhead", "A worker on Ray against a local worker (issue 17)", table)


if __name__ == "__main__":
    main()
