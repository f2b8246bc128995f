"""`python -m loadgen sweep --rates 1,2,4,8 ...`: one run per rate in DIR/rate_<r>/, then
DIR/sweep.json and DIR/sweep.png (goodput and TTFT/TPOT percentiles against the rate).

`--simulate` sweeps the simulator instead of a server (the rest of the command line is
`loadgen simulate`'s, --seeds included). With `--capacity-metric KEY --capacity-max X` (and
`--capacity-tbt` to also require every TBT target met) the sweep reports the capacity at that SLO:
per seed, the highest load before the first rate that misses it, interpolated linearly on the
metric up to the first miss; then its mean and 95% interval over seeds. A run that meets the SLO at
every rate gives the highest rate tried: a lower bound, flagged `capacity_lower_bound`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec
from matplotlib.figure import Figure
from rich.console import Console

from loadgen import bench
from loadgen.args import add_client_args, add_output_arg, add_workload_args, positive_float
from loadgen.metrics import mean_ci95
from loadgen.report import json_safe


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _rates(text: str) -> list[float]:
    return [positive_float(part) for part in text.split(",") if part.strip()]


def sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rates", type=_rates, required=True, help="comma-separated request rates; "
                        "they replace --rate")
    parser.add_argument("--simulate", action="store_true", help="sweep `loadgen simulate` (its options follow)")
    c = parser.add_argument_group("capacity at an SLO")
    c.add_argument("--capacity-metric", metavar="KEY", help="summary key the SLO bounds, e.g. median_ttft_ms")
    c.add_argument("--capacity-max", type=float, metavar="X", help="the SLO: KEY <= X")
    c.add_argument("--capacity-tbt", action="store_true", help="also require every TBT target met")


def main(argv: list[str]) -> int:
    head = argparse.ArgumentParser(add_help=False)
    sweep_args(head)
    known, rest = head.parse_known_args(argv)
    if known.simulate:
        from loadgen import simulate

        args = argparse.Namespace(**vars(simulate.build_parser().parse_args(rest)), **vars(known))
        run_one = simulate.simulate
    else:
        parser = argparse.ArgumentParser(prog="python -m loadgen sweep", description=__doc__)
        sweep_args(parser)
        add_client_args(parser)
        add_workload_args(parser)
        add_output_arg(parser)
        args = parser.parse_args(argv)
        run_one = bench.run
    out = Path(args.output)
    console = Console()
    runs = []
    for rate in args.rates:
        run_dir = out / f"rate_{rate_label(rate)}"
        console.rule(f"rate {rate_label(rate)} req/s")
        results = run_one(argparse.Namespace(**{**vars(args), "rate": rate, "output": str(run_dir)}), console)
        runs.append({"rate": rate_label(rate), "dir": str(run_dir), "summary": results["summary"],
                     "seed_summaries": results.get("seed_summaries", [results["summary"]])})
    sweep = {"config": json_safe(vars(args) | {"rates": [rate_label(r) for r in args.rates]}), "runs": runs}
    if args.capacity_metric:
        sweep["capacity"] = capacity(args.rates, runs, args.capacity_metric, args.capacity_max, args.capacity_tbt)
        c = sweep["capacity"]
        console.print(f"capacity at {args.capacity_metric} <= {args.capacity_max:g}"
                      f"{' with TBT met' if args.capacity_tbt else ''}: {c['mean']:.3g} ± {c['ci95']:.2g} req/s"
                      f"{' (a lower bound: met at every rate)' if c['lower_bound'] else ''}")
    (out / "sweep.json").write_bytes(msgspec.json.format(msgspec.json.encode(sweep), indent=2))
    console.print(f"wrote {out / 'sweep.json'} and {plot_sweep(out / 'sweep.png', runs)}")
    return 0


def capacity_of(rates: list[float], summaries: list[dict], metric: str, limit: float, tbt: bool) -> tuple[float, bool]:
    """Highest load meeting the SLO for one seed: the last rate before the first miss, moved toward
    that miss by linear interpolation of the metric when the metric (not TBT) missed. Returns
    (capacity, whether every rate met it)."""
    def met(s: dict) -> bool:
        value = s.get(metric)
        return value is not None and value <= limit and (not tbt or all(t["met"] for t in s.get("tbt_tiers", {}).values()))

    for i, (rate, s) in enumerate(zip(rates, summaries)):
        if met(s):
            continue
        if i == 0:
            return 0.0, False
        before, after = summaries[i - 1][metric], s.get(metric)
        if after is None or after <= limit or after == before:  # TBT missed, or no slope to follow
            return rates[i - 1], False
        return rates[i - 1] + (rates[i] - rates[i - 1]) * (limit - before) / (after - before), False
    return rates[-1], True


def capacity(rates: list[float], runs: list[dict], metric: str, limit: float, tbt: bool) -> dict:
    per_seed = [capacity_of(rates, [r["seed_summaries"][k] for r in runs], metric, limit, tbt)
                for k in range(len(runs[0]["seed_summaries"]))]
    mean, ci = mean_ci95([c for c, _ in per_seed])
    return {"metric": metric, "max": limit, "tbt": tbt, "per_seed": [c for c, _ in per_seed], "mean": mean,
            "ci95": ci, "lower_bound": any(lb for _, lb in per_seed)}


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
