"""How well the simulator predicts the live server: for each scheduler, one live server with a step
log, a fit run, then live runs at several rates, each replayed through the simulator on the fitted
step model; prints and writes the relative error of each figure.

    python benchmarks/replay_accuracy.py --schedulers fcfs,larry,slai,sarathi --rates 2.5,3,3.5 \
        --num-requests 400 --output out/replay-accuracy

The same CPU setup as tests/test_replay.py (demo model, 2 workers, SAL, Azure conversation requests
clamped to --max-model-len tokens), larger.
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


def live(server: ServerProcess, out: Path, args, seed: int, rate: str, num_requests: int) -> None:
    loadgen("--base-url", server.url + "/v1", "--workload", args.workload, "--max-model-len", str(args.max_model_len),
            "--seed", str(seed), "--num-requests", str(num_requests), "--rate", rate, "--output", str(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedulers", default="fcfs")
    p.add_argument("--rates", default="3.5")
    p.add_argument("--fit-rate", default="3")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--fit-requests", type=int, default=100)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--workload", default=str(CONV_TRACE))
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    table = {}
    for scheduler in args.schedulers.split(","):
        out = args.output / scheduler
        server = ServerProcess("--workers", "2", "--balancer", "sal", "--scheduler", scheduler,
                               "--step-log", str(out / "steps"))
        try:
            live(server, out / "fit", args, 1, args.fit_rate, args.fit_requests)
            for rate in args.rates.split(","):
                live(server, out / f"live-{rate}", args, 0, rate, args.num_requests)
        finally:
            server.stop()
        loadgen("simulate", "fit", "--step-log", str(out / "steps"), "--results", str(out / "fit"),
                "--output", str(out / "model.json"))
        for rate in args.rates.split(","):
            loadgen("replay", str(out / f"live-{rate}"), "--step-model", str(out / "model.json"),
                    "--output", str(out / f"replay-{rate}"))
            r = json.loads((out / f"replay-{rate}" / "results.json").read_text())
            table[f"{scheduler} @ {rate}/s"] = {k: (r["live"].get(k), r["summary"].get(k), r["relative_error"].get(k))
                                               for k in FIGURES}
    (args.output / "accuracy.json").write_text(json.dumps(table, indent=2))
    print("| run | " + " | ".join(FIGURES) + " |")
    print("|---" * (len(FIGURES) + 1) + "|")
    for run, figures in table.items():
        cells = [f"{lv:.1f} / {sv:.1f} ({e:+.1%})" if e is not None else "-" for lv, sv, e in figures.values()]
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
