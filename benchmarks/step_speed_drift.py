"""How the machine's speed drifts under a live server: from the step logs of a
`benchmarks/replay_accuracy.py --output DIR` run, per scheduler (one server each):

- per run (capacity, fit, each measured load): the mean execute time of the same work, decode steps of
  1-3 sequences, the run's total step time over a step model fitted on the first two runs, and the
  run's own server path (request_s, first_token_s: what `simulate fit` takes from the fit run);
- the speed per window of W seconds (every worker's steps over the model fitted on the whole log):
  its standard deviation, its correlation with the next window's, and with the window's output
  token rate (the HTTP process's work).

    python benchmarks/step_speed_drift.py DIR [--windows 1,2,5,10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen.report import load_results  # noqa: E402
from loadgen.step_model import (fit_steps, predict_steps, read_step_logs, run_window, server_path,  # noqa: E402
                                step_targets, window_speeds)


def runs_of(server: Path) -> dict[str, dict]:
    return {d.name: load_results(d) for d in sorted(server.iterdir())
            if (d / "results.json").is_file() and not d.name.startswith("replay")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path, help="a replay_accuracy.py --output directory")
    p.add_argument("--windows", default="1,2,5,10", help="window lengths in seconds")
    args = p.parse_args()
    for server in sorted(d for d in args.output.iterdir() if (d / "steps").is_dir()):
        rows = read_step_logs(server / "steps")
        runs = runs_of(server)
        spans = {name: run_window(results) for name, results in runs.items()}
        within = {name: [r for r in rows if a <= r["start"] <= b] for name, (a, b) in spans.items()}
        fitted, _ = fit_steps(within["capacity"] + within["fit"])
        print(f"== {server.name}")
        for name, run in within.items():
            x, y = step_targets(run)
            small = np.array([r["num_seqs"] < 4 and r["prefill_tokens"] == 0 for r in run])
            execute = np.array([r["execute_s"] for r in run])
            path = server_path(run, [runs[name]])
            print(f"  {name:14s} decodes of 1-3 sequences: {execute[small].mean() * 1e3:.2f} ms execute; "
                  f"steps vs the model of the first two runs: {y.sum() / predict_steps(fitted, x).sum() - 1:+.1%}; "
                  f"request_s {path['request_s'] * 1e3:.2f} ms, first_token_s {path['first_token_s'] * 1e3:.2f} ms")
        whole, _ = fit_steps(rows)
        x, y = step_targets(rows)
        predicted = predict_steps(whole, x)
        tokens = np.array([sum(1 for c in r["chunks"] if c[3]) for r in rows], dtype=np.float64)
        for w in map(float, args.windows.split(",")):
            window, speed = window_speeds(rows, y, predicted, w)
            full = ~np.isnan(speed)
            pairs = full[:-1] & full[1:]
            lag1 = np.corrcoef(speed[:-1][pairs], speed[1:][pairs])[0, 1]
            rate = np.bincount(window, tokens)[full] / w
            print(f"  windows of {w:g} s ({full.sum()}): speed sd {np.nanstd(speed):.1%}, "
                  f"p5-p95 {np.nanpercentile(speed, 5):.2f}-{np.nanpercentile(speed, 95):.2f}, "
                  f"correlation with the next window {lag1:+.2f}, "
                  f"with output tok/s {np.corrcoef(rate, speed[full])[0, 1]:+.2f}")


if __name__ == "__main__":
    main()
