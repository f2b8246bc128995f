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

Each measured run is replayed twice: on the fitted model, and at the measured run's own step speed
(every time the model charges scaled by one factor, the run's total step time over the model's
prediction for its steps, as tests/test_replay.py checks: `StepModel.at_speed`), which takes out how much faster or slower the machine
ran than during the fit runs and leaves the error of the simulation. `--replay-only` refits and
replays the live runs already in --output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from loadgen.step_model import StepModel  # noqa: E402
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
    p.add_argument("--replay-only", action="store_true", help="refit and replay the live runs in --output")
    p.add_argument("--fit-args", default="", help="more options for `simulate fit`, as one string "
                                                  "(\"--speed-window-s 2 --speed-correlation 0\")")
    args = p.parse_args()
    args.output = args.output.resolve()  # the server and loadgen run from the repository root
    tables = {"fitted": {}, "at the measured speed": {}}
    for scheduler in args.schedulers.split(","):
        out = args.output / scheduler
        if args.replay_only:
            rates = sorted((d.name.removeprefix("live-") for d in out.glob("live-*")), key=float)
        else:
            rates = live_runs(out, scheduler, args)
        loadgen("simulate", "fit", "--step-log", str(out / "steps"), "--results", str(out / "capacity"),
                "--results", str(out / "fit"), "--output", str(out / "model.json"), *shlex.split(args.fit_args))
        fitted = StepModel.load(out / "model.json")
        for rate in rates:
            r = replay(out / f"live-{rate}", out / "model.json", out / f"replay-{rate}")
            tables["fitted"][f"{scheduler} @ {rate}/s"] = r
            # The machine's speed during the measured run: its own steps over the model's time for them.
            at_speed = fitted.at_speed(1 + r["steps_vs_model"])
            (out / f"model-at-{rate}.json").write_text(json.dumps(at_speed.as_dict()))
            tables["at the measured speed"][f"{scheduler} @ {rate}/s"] = replay(
                out / f"live-{rate}", out / f"model-at-{rate}.json", out / f"replay-{rate}-at-measured-speed")
        write_tables(args.output, tables)  # after each scheduler: a long run that is cut short keeps what it has


def live_runs(out: Path, scheduler: str, args) -> list[str]:
    """One server with a step log: the capacity run, the fit run and the measured runs; their rates."""
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
    return rates


def replay(run: Path, model: Path, out: Path) -> dict:
    loadgen("replay", str(run), "--step-model", str(model), "--output", str(out))
    r = json.loads((out / "results.json").read_text())
    row = {k: (r["live"].get(k), r["summary"].get(k), r["relative_error"].get(k)) for k in FIGURES}
    # The measured run's own steps against the model: a machine that changed speed since the fit.
    row["steps_vs_model"] = r.get("live_steps", {}).get("total_time_rel_error")
    return row


def write_tables(output: Path, tables: dict) -> None:
    (output / "accuracy.json").write_text(json.dumps(tables, indent=2))
    lines = []
    for name, table in tables.items():
        lines += [f"Step model: {name}", "", "| run | " + " | ".join(FIGURES) + " | steps vs model |",
                  "|---" * (len(FIGURES) + 2) + "|"]
        for run, row in table.items():
            cells = [f"{lv:.1f} / {sv:.1f} ({e:+.1%})" if e is not None else "-" for lv, sv, e in map(row.get, FIGURES)]
            steps = row.get("steps_vs_model")
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {'-' if steps is None else f'{steps:+.1%}'} |")
        lines.append("")
    (output / "accuracy.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
