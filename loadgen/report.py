"""results.json, the terminal summary and the plots of one run (live or simulated).

results.json = {"summary", "requests", "config", "timeseries", "server"}: see metrics.summarize,
metrics.RequestRecord, metrics.client_timeseries and scrape.MetricsPoller.result for their contents.
Plots use matplotlib's object API (Figure, no pyplot), which renders with Agg and keeps no global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from loadgen.metrics import LATENCIES, RequestRecord

RESULTS = "results.json"
LATENCY_PLOT = "latency_cdf.png"
TIMELINE_PLOT = "timeline.png"
WORKERS_PLOT = "workers.png"
# Rows of the terminal summary and of `compare`: (label, summary key, format).
MAIN_METRICS = [
    ("Completed requests", "completed", "{:d}"),
    ("Failed requests", "failed", "{:d}"),
    ("Duration (s)", "duration", "{:.2f}"),
    ("Input tokens", "total_input_tokens", "{:d}"),
    ("Output tokens", "total_output_tokens", "{:d}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Request goodput (req/s)", "request_goodput", "{:.2f}"),
    ("Output throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", "{:.1f}"),
] + [
    (f"{stat.capitalize()} {name.upper()} (ms)", f"{stat}_{name}_ms", "{:.2f}")
    for name in LATENCIES for stat in ("mean", "median", "p90", "p99")
]


def _encode(value) -> bytes:
    return msgspec.json.encode(value, enc_hook=_enc_hook)


def _enc_hook(value):
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def json_safe(config: dict) -> dict:
    """Config values as JSON keeps them: inf (e.g. --rate inf) as the string "inf", paths as str."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in config.items()}


def write_results(
    output_dir: str | Path, summary: dict, records: list[RequestRecord | dict], config: dict,
    timeseries: dict, server: dict, extra: dict | None = None,
) -> Path:
    """Write results.json; one request per line keeps a file of thousands of requests readable.
    `extra`: more top-level sections (the simulator's summary_ci95, a replay's "live" and "relative_error")."""
    path = Path(output_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = {"summary": summary, "config": json_safe(config), "server": server, "timeseries": timeseries,
                **(extra or {})}
    parts = [f'"{key}": {msgspec.json.format(_encode(value), indent=2).decode()}' for key, value in sections.items()]
    parts.append('"requests": [\n' + ",\n".join(_encode(row).decode() for row in records) + "\n]")
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    return path


def load_results(run_dir: str | Path) -> dict:
    return msgspec.json.decode(Path(run_dir, RESULTS).read_bytes())


def fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def print_summary(summary: dict, console: Console | None = None, title: str = "Benchmark result") -> None:
    table = Table(title=title)
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for label, key, spec in MAIN_METRICS:
        table.add_row(label, fmt(summary.get(key), spec))
    if "worker_busy_s" in summary:  # per-worker load: simulated, or scraped from halffull's /metrics
        table.add_row("Busy time per worker (s)", " ".join(f"{b:.1f}" for b in summary["worker_busy_s"]))
        table.add_row("Tokens per worker", " ".join(f"{t:d}" for t in summary["worker_tokens"]))
        for name in ("busy", "tokens"):
            table.add_row(f"Imbalance {name}: max/mean, CV", f"{summary[f'imbalance_{name}_max_over_mean']:.3f}, "
                                                              f"{summary[f'imbalance_{name}_cv']:.3f}")
    (console or Console()).print(table)


def plot_run(output_dir: str | Path, results: dict) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, E2E), timeline.png (throughput, in flight, server state) and, when
    the summary has per-worker load, workers.png."""
    out = Path(output_dir)
    ok = [r for r in results["requests"] if r["success"]]
    paths = [_plot_latency_cdfs(out / LATENCY_PLOT, ok), _plot_timeline(out / TIMELINE_PLOT, results)]
    if "worker_busy_s" in results["summary"]:
        paths.append(_plot_workers(out / WORKERS_PLOT, results["summary"]))
    return paths


def cdf_line(ax, values: list[float], label: str | None = None) -> None:
    if values:
        x = np.sort(np.asarray(values, dtype=np.float64))
        ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)


def _plot_latency_cdfs(path: Path, ok: list[dict]) -> Path:
    fig = Figure(figsize=(13, 4), layout="constrained")
    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2el_ms", "E2E latency"))
    for ax, (key, title) in zip(fig.subplots(1, 3), panels):
        cdf_line(ax, [r[key] for r in ok if r[key] is not None])
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def _plot_timeline(path: Path, results: dict) -> Path:
    ts, server = results["timeseries"], results.get("server") or {}
    scraped = bool(server.get("available"))
    fig = Figure(figsize=(10, 9 if scraped else 4), layout="constrained")
    axes = fig.subplots(3 if scraped else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(ts["t_s"], ts["output_throughput"], color="tab:blue")
    ax.set(ylabel="output tokens/s", title="Throughput and requests in flight (client side)")
    twin = ax.twinx()
    twin.plot(ts["t_s"], ts["in_flight"], color="tab:orange")
    twin.set_ylabel("in flight", color="tab:orange")
    if scraped:
        def series(key, scale=1.0):
            return [math.nan if v is None else scale * v for v in server[key]]

        ax = axes[1]
        ax.plot(server["t_s"], series("num_requests_running"), label="running")
        ax.plot(server["t_s"], series("num_requests_waiting"), label="waiting")
        preemptions = fmt(server["num_preemptions"], "{:g}")
        ax.set(ylabel="requests", title=f"Server (preemptions during the run: {preemptions})")
        ax.legend(loc="upper left")
        axes[2].plot(server["t_s"], series("kv_cache_usage_perc", 100), color="tab:red")
        axes[2].set(ylabel="KV cache used (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    fig.savefig(path, dpi=100)
    return path


def _plot_workers(path: Path, summary: dict) -> Path:
    """Busy time and processed tokens per worker, with the mean: the load-imbalance figure."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = (("worker_busy_s", "busy", "busy time (s)"), ("worker_tokens", "tokens", "tokens processed"))
    for ax, (key, name, ylabel) in zip(fig.subplots(1, 2), panels):
        values = summary[key]
        ax.bar([str(i) for i in range(len(values))], values, color="tab:blue")
        ax.axhline(float(np.mean(values)), color="tab:gray", linestyle="--", label="mean")
        ax.set(xlabel="worker", ylabel=ylabel,
               title=f"max/mean {summary[f'imbalance_{name}_max_over_mean']:.3f}, "
                     f"CV {summary[f'imbalance_{name}_cv']:.3f}")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
    return path
