"""How well the simulator predicts the live server: for each scheduler, one live server with a step
log, a capacity run and a fit run, then live runs at several rates, each replayed through the
simulator on the step model fitted on the first two; prints and writes the relative error of each
figure.

    python benchmarks/replay_accuracy.py --schedulers fcfs,larry,slai,sarathi --loads 0.5,0.7,0.9 \
        --num-requests 400 --output out/replay-accuracy

The same CPU setup as tests/test_replay.py (demo model, 2 workers, SAL, Azure conversation requests
clamped to --max-model-len tokens), larger: the capacity run keeps 16 requests in flight (the
machine's capacity, and steps of large batches); the fit run sends Poisson arrivals at --fit-load
of that capacity (another seed: the server path as Poisson arrivals meet it, and steps of every
batch size below; with the capacity run it brackets the measured rates); each measured run sends
Poisson arrivals at a fraction (--loads) of capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_utils import CONV_TRACE, ServerProcess  # noqa: E402

FIGURES = ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms",
           "output_throughput")


def loadgen(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "loadgen", *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "COLUMNS": "160"})


def live(server: ServerProcess, out: Path, args, seed: int, num_requests: int, *load: str) -> None:
    loadgen("--base-url", server.url + "/v1", "--workload", args.workload, "--max-model-len", str(args.max_model_len),
            "--seed", str(seed), "--num-requests", str(num_requests), *load, "--output", str(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedulers", default="fcfs")
    p.add_argument("--loads", default="0.8", help="measured runs' rates, as fractions of the capacity run's throughput")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--fit-requests", type=int, default=100, help="requests of the capacity run and of the fit run")
    p.add_argument("--fit-load", type=float, default=0.6, help="the fit run's rate, as a fraction of capacity")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--workload", default=str(CONV_TRACE))
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    args.output = args.output.resolve()  # the server and loadgen run from the repository root
    table = {}
    for scheduler in args.schedulers.split(","):
        out = args.output / scheduler
        server = ServerProcess("--workers", "2", "--balancer", "sal", "--scheduler", scheduler,
                               "--step-log", str(out / "steps"))
        rates = []
        try:
            live(server, out / "capacity", args, 2, args.fit_requests, "--rate", "inf", "--max-concurrency", "16")
            capacity = json.loads((out / "capacity" / "results.json").read_text())["summary"]["request_throughput"]
            live(server, out / "fit", args, 1, args.fit_requests, "--rate", f"{args.fit_load * capacity:.3f}")
            # Each run its own seed: prompts are drawn per (seed, request index), and the server's prefix
            # cache keeps earlier runs' blocks, so runs of one seed would repeat prompts and skip most of
            # their prefill, which the replay (no two requests share a prefix) cannot know.
            for i, load in enumerate(args.loads.split(",")):
                rates.append(f"{float(load) * capacity:.3f}")
                live(server, out / f"live-{rates[-1]}", args, 10 + i, args.num_requests, "--rate", rates[-1])
        finally:
            server.stop()
        loadgen("simulate", "fit", "--step-log", str(out / "steps"), "--results", str(out / "capacity"),
                "--results", str(out / "fit"), "--output", str(out / "model.json"))
        for rate in rates:
            loadgen("replay", str(out / f"live-{rate}"), "--step-model", str(out / "model.json"),
                    "--output", str(out / f"replay-{rate}"))
            r = json.loads((out / f"replay-{rate}" / "results.json").read_text())
            row = {k: (r["live"].get(k), r["summary"].get(k), r["relative_error"].get(k)) for k in FIGURES}
            # The measured run's own steps against the model: a machine that changed speed since the fit.
            row["steps_vs_model"] = r.get("live_steps", {}).get("total_time_rel_error")
            table[f"{scheduler} @ {rate}/s"] = row
        write_table(args.output, table)  # after each scheduler: a long run that is cut short keeps what it has


def write_table(output: Path, table: dict) -> None:
    (output / "accuracy.json").write_text(json.dumps(table, indent=2))
    lines = ["| run | " + " | ".join(FIGURES) + " | steps vs model |", "|---" * (len(FIGURES) + 2) + "|"]
    for run, row in table.items():
        cells = [f"{lv:.1f} / {sv:.1f} ({e:+.1%})" if e is not None else "-" for lv, sv, e in map(row.get, FIGURES)]
        steps = row.get("steps_vs_model")
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {'-' if steps is None else f'{steps:+.1%}'} |")
    (output / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
