"""`python -m loadgen compare DIR...`: runs side by side, as a table and as compare.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from loadgen.report import MAIN_METRICS, cdf_line, fmt, load_results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen compare", description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="DIR", help="directories holding a results.json")
    parser.add_argument("--output", default=".", metavar="DIR", help="where compare.png goes")
    args = parser.parse_args(argv)
    results = [load_results(d) for d in args.runs]
    names = run_names(args.runs)
    console = Console()
    console.print(comparison_table(names, [r["summary"] for r in results]))
    console.print(f"wrote {plot_comparison(Path(args.output) / 'compare.png', names, results)}")
    return 0


def run_names(dirs: list[str]) -> list[str]:
    """Each run's folder name, or the path as given where folder names collide."""
    names = [Path(d).resolve().name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def comparison_table(names: list[str], summaries: list[dict]) -> Table:
    table = Table(title="Comparison")
    table.add_column("Metric")
    for name in names:
        table.add_column(name, justify="right")
    for label, key, spec in MAIN_METRICS:
        table.add_row(label, *(fmt(s.get(key), spec) for s in summaries))
    return table


def plot_comparison(path: Path, names: list[str], results: list[dict]) -> Path:
    """TTFT and TPOT CDFs with one line per run, and bars of output throughput and goodput."""
    fig = Figure(figsize=(16, 4), layout="constrained")
    ttft_ax, tpot_ax, tput_ax, good_ax = fig.subplots(1, 4)
    for name, res in zip(names, results):
        ok = [r for r in res["requests"] if r["success"]]
        cdf_line(ttft_ax, [r["ttft_ms"] for r in ok], name)
        cdf_line(tpot_ax, [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None], name)
    for ax, title in ((ttft_ax, "TTFT"), (tpot_ax, "TPOT")):
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    positions = range(len(names))
    for ax, key, title in ((tput_ax, "output_throughput", "Output throughput (tok/s)"),
                           (good_ax, "request_goodput", "Request goodput (req/s)")):
        ax.bar(positions, [res["summary"][key] or 0 for res in results], color=[f"C{i}" for i in positions])
        ax.set_xticks(list(positions), names, rotation=20, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
