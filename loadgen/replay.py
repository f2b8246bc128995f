"""`python -m loadgen replay RUN_DIR --step-model MODEL.json --output OUT`: simulate exactly the
requests of a live run and set the simulation beside what was measured.

From RUN_DIR/results.json: each request's send time, prompt and output lengths, and the server's
settings the run recorded from /server_info (scheduler, balancer and their knobs, workers, KV
blocks, block size, token budget, seats, context length, output-length mode, seed), and what the
client declared (each max_tokens, ignore_eos). The simulator (loadgen/simulate.py)
runs those policies on the step model, with the KV prefix cache on if the server had it on; the
server path is added around it: a request reaches its worker `request_s` after it was sent, its
first token reaches the client `first_token_s` after its step, and its stream ends `token_s` after
the step of its last token, each drawn per request from the spread the fit measured (and each
step's time from its spread), with the server's seed.

OUT/results.json holds `summary` (the simulated run, loadgen's keys), `live` (the run's own
summary), `relative_error` ((simulated - live) / live per numeric key, element-wise for per-worker
lists), `live_steps` (if the server logged its steps: how the live run's own steps compare with the
step model, which tells a machine that changed speed since the fit from an error of the simulation)
and the replayed requests; the console shows both side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from balancer import BALANCERS
from loadgen.metrics import RequestRecord, benchmark_duration, client_timeseries, summarize
from loadgen.report import load_results, plot_run, write_results
from loadgen.simulate import Simulation, SimulationError, build_parser
from loadgen.step_model import StepModel, predict_steps, read_step_logs, run_window, step_targets
from loadgen.workload import WorkloadRequest
from scheduling import SCHEDULERS

TABLE = [("Mean TTFT (ms)", "mean_ttft_ms"), ("Median TTFT (ms)", "median_ttft_ms"), ("P99 TTFT (ms)", "p99_ttft_ms"),
         ("Mean TPOT (ms)", "mean_tpot_ms"), ("Median TPOT (ms)", "median_tpot_ms"), ("P99 TPOT (ms)", "p99_tpot_ms"),
         ("Mean E2EL (ms)", "mean_e2el_ms"), ("Median E2EL (ms)", "median_e2el_ms"), ("P99 E2EL (ms)", "p99_e2el_ms"),
         ("Output throughput (tok/s)", "output_throughput"), ("Request throughput (req/s)", "request_throughput"),
         ("Duration (s)", "duration"), ("Preemptions", "num_preemptions"), ("Tokens per worker", "worker_tokens")]


def simulation_args(info: dict, live_config: dict, output: str) -> argparse.Namespace:
    """The simulator's options for the server `info` describes (its /server_info)."""
    args = build_parser().parse_args([
        "--workload", "synthetic", "--output", output, "--scheduler", info["scheduler"],
        "--balancer", info["balancer"], "--workers", str(info["num_workers"]), "--block-size", str(info["block_size"]),
        "--max-num-seqs", str(info["max_num_seqs"]), "--max-num-batched-tokens", str(info["max_num_batched_tokens"]),
        "--seed", str(info.get("seed", 0)), "--output-length", info.get("output_length", "history")])
    for registry, policy, knobs in ((SCHEDULERS, info["scheduler"], info.get("scheduler_knobs", {})),
                                    (BALANCERS, info["balancer"], info.get("balancer_knobs", {}))):
        for name, value in knobs.items():
            setattr(args, f"knob:{registry.kind}:{policy}:{name}", value)
    args.max_concurrency = live_config.get("max_concurrency")
    return args


def live_preemptions(live: dict) -> float | None:
    value = (live.get("server") or {}).get("num_preemptions")
    if isinstance(value, list):
        value = next((v for v in reversed(value) if v is not None), None)
    return value


def relative_errors(simulated: dict, live: dict) -> dict:
    out = {}
    for key, lv in live.items():
        sv = simulated.get(key)
        if isinstance(lv, (int, float)) and not isinstance(lv, bool) and isinstance(sv, (int, float)) and lv:
            out[key] = (sv - lv) / lv
        elif isinstance(lv, list) and isinstance(sv, list) and len(lv) == len(sv) and all(lv):
            out[key] = [(s - v) / v for s, v in zip(sv, lv)]
    return out


def replay(run_dir: str | Path, step_model: str | Path, output: str | Path, console: Console | None = None) -> dict:
    console = console or Console()
    live = load_results(run_dir)
    config = live["config"]
    info = config.get("server_info")
    if not info:
        raise ValueError(f"{run_dir}: the run recorded no server settings (/server_info); "
                         "replay needs a run of this version of loadgen against halffull")
    model = StepModel.load(step_model)
    rows = [q for q in live["requests"] if q["success"]]
    if len(rows) < len(live["requests"]):
        console.print(f"[yellow]{len(live['requests']) - len(rows)} failed requests of the live run are left out")
    # Arrivals at the balancer (and at once the worker): the send time plus the server path before the engine.
    rng = np.random.default_rng([info.get("seed", 0), 6])
    schedule = [WorkloadRequest(q["input_tokens"], q["output_tokens"],
                                arrival_s=q["start_s"] + model.draw("request", rng)) for q in rows]
    args = simulation_args(info, config, str(output))
    sim = Simulation(args, schedule, model, info["num_kv_blocks"], info["max_model_len"],
                     info.get("enable_prefix_caching", False))
    # What the live client declared: each request's max_tokens, and whether it ignored EOS (then every
    # policy that predicts output lengths knew them exactly).
    sim.ignore_eos = config.get("ignore_eos", False)
    for track, q in zip(sim.tracks, rows):
        track.max_tokens = q.get("requested_output_tokens") or track.max_tokens
    sim.run()
    for track, q in zip(sim.tracks, rows):
        track.start_s = q["start_s"]
        first, last = model.draw("first_token", rng), model.draw("token", rng)
        track.times = [track.times[0] + first] + [t + last for t in track.times[1:]]
    records: list[RequestRecord] = sim.records()
    duration = benchmark_duration(records)
    summary = summarize(records, duration)
    server = sim.server_timeline(duration)
    summary |= sim.summary_extras(server["kv_cache_usage_perc"])
    live_summary = dict(live["summary"])
    preemptions = live_preemptions(live)
    if preemptions is not None:
        live_summary["num_preemptions"] = preemptions
    errors = relative_errors(summary, live_summary)
    sim_config = {"command": "replay", "run_dir": str(run_dir), "step_model": model.as_dict(), "server_info": info}
    timeseries = client_timeseries(records, duration)
    rows = [r.as_dict() | {"worker": t.worker} for r, t in zip(records, sim.tracks)]
    comparison = {"live": live_summary, "relative_error": errors}
    steps = live_step_error(info, live, model)
    if steps is not None:
        comparison["live_steps"] = steps
    write_results(output, summary, rows, sim_config, timeseries, server, comparison)
    results = {"summary": summary, "requests": rows, "config": sim_config, "timeseries": timeseries,
               "server": server, **comparison}
    plot_run(output, results)
    console.print(comparison_table(summary, live_summary, errors, run_dir))
    if steps is not None:
        console.print(f"The live run's own {steps['steps']} steps took {steps['total_time_rel_error']:+.1%} "
                      f"against the step model's time for them (mean |error| per step "
                      f"{steps['mean_abs_rel_error']:.1%}); a machine that changed speed since the fit shows here")
    return results


def live_step_error(info: dict, live: dict, model: StepModel) -> dict | None:
    """If the server logged its steps (--step-log), how the live run's own steps compare with the step
    model: (measured - predicted) / predicted in total and per step. A machine that slowed down or
    sped up since the fit shows here, apart from any error of the simulation itself."""
    directory, span = info.get("step_log"), run_window(live)
    if not directory or span is None or not Path(directory).is_dir():
        return None
    rows = [r for r in read_step_logs(directory) if span[0] <= r.get("start", -1.0) <= span[1]]
    if not rows:
        return None
    x, measured = step_targets(rows)
    predicted = predict_steps(model, x)
    return {"steps": len(rows), "total_time_rel_error": float(measured.sum() / predicted.sum() - 1),
            "mean_abs_rel_error": float(np.mean(np.abs(measured / predicted - 1)))}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return " ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def comparison_table(sim: dict, live: dict, errors: dict, run_dir) -> Table:
    table = Table(title=f"Live run {run_dir} against its replay")
    for name, justify in (("Metric", "left"), ("Live", "right"), ("Simulated", "right"), ("Error", "right")):
        table.add_column(name, justify=justify)
    for label, key in TABLE:
        e = errors.get(key)
        err = "-" if e is None else " ".join(f"{x:+.1%}" for x in e) if isinstance(e, list) else f"{e:+.1%}"
        table.add_row(label, _fmt(live.get(key)), _fmt(sim.get(key)), err)
    return table


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a loadgen --output folder of a live run")
    p.add_argument("--step-model", required=True, metavar="MODEL.json", help="what simulate fit wrote")
    p.add_argument("--output", required=True, metavar="OUT", help="where results.json and plots go")
    args = p.parse_args(argv)
    try:
        replay(args.run_dir, args.step_model, args.output)
    except (SimulationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
