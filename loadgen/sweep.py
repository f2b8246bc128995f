"""`python -m loadgen sweep --rates 1,2,4,8 ...`: one run per rate in DIR/rate_<r>/, then
DIR/sweep.json and DIR/sweep.png (goodput and TTFT/TPOT percentiles against the rate)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec
from matplotlib.figure import Figure
from rich.console import Console

from loadgen import bench
from loadgen.args import add_client_args, add_output_arg, add_workload_args, positive_float
from loadgen.report import json_safe


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _rates(text: str) -> list[float]:
    return [positive_float(part) for part in text.split(",") if part.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen sweep", description=__doc__)
    parser.add_argument("--rates", type=_rates, required=True, help="comma-separated request rates; "
                        "they replace --rate")
    add_client_args(parser)
    add_workload_args(parser)
    add_output_arg(parser)
    args = parser.parse_args(argv)
    out = Path(args.output)
    console = Console()
    runs = []
    for rate in args.rates:
        run_dir = out / f"rate_{rate_label(rate)}"
        console.rule(f"rate {rate_label(rate)} req/s")
        results = bench.run(argparse.Namespace(**{**vars(args), "rate": rate, "output": str(run_dir)}), console)
        runs.append({"rate": rate_label(rate), "dir": str(run_dir), "summary": results["summary"]})
    sweep = {"config": json_safe(vars(args) | {"rates": [rate_label(r) for r in args.rates]}), "runs": runs}
    (out / "sweep.json").write_bytes(msgspec.json.format(msgspec.json.encode(sweep), indent=2))
    console.print(f"wrote {out / 'sweep.json'} and {plot_sweep(out / 'sweep.png', runs)}")
    return 0


def plot_sweep(path: Path, runs: list[dict]) -> Path:
    """Rates sit at evenly spaced positions, so a geometric series (and 'inf') reads well."""
    fig = Figure(figsize=(14, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    x = range(len(runs))
    panels = (
        ("Throughput (req/s)", (("request_throughput", "throughput"), ("request_goodput", "goodput"))),
        ("TTFT (ms)", (("median_ttft_ms", "median"), ("p99_ttft_ms", "p99"))),
        ("TPOT (ms)", (("median_tpot_ms", "median"), ("p99_tpot_ms", "p99"))),
    )
    for ax, (title, lines) in zip(axes, panels):
        for key, label in lines:
            ax.plot(x, [math.nan if r["summary"][key] is None else r["summary"][key] for r in runs],
                    marker="o", label=label)
        ax.set_xticks(list(x), [r["rate"] for r in runs])
        ax.set(title=title, xlabel="offered rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    return path
