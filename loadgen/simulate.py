"""`python -m loadgen simulate`: the real scheduler and balancer policies on a step-time model, in
virtual time, writing the same results.json and plots as a live run.

    python -m loadgen simulate --scheduler fcfs [--balancer sal --workers 4]
        [--preset h100-llama3-8b | --step-model FILE | --fit-step-log FILE] [--kv-tokens K]
        --workload PATH.csv --rate R --output DIR
    python -m loadgen simulate fit --step-log DIR [--results RUN_DIR] --output MODEL.json

Discrete events in virtual time. Each worker is a real Scheduler over a real KVBlockManager; a step
takes what the step model (loadgen/step_model.py) charges for the work scheduling/step_cost.py
counts in its plan, times a draw from its per-step spread and the machine's speed in that window of
virtual time (one per window, shared by the workers and correlated with the window before: the step
model's MachineSpeed; both 1 for a preset). Requests reach the balancer at their arrival times, and
the real balancer policy routes them over real WorkerLoads. A worker does what the worker process
does: after each step it sends a LoadReport built from its scheduler's stats(), which the balancer
sees `--report-delay-ms` later, then, the step model's `loop_s` later if work remains (the worker
loop's own time), it takes in the requests that arrived meanwhile and plans the next one. So the
balancer decides on stale reports plus its own exact record of what it sent since, as in the real
process. Requests reach a worker instantly.

A trace gives token counts, not tokens. Each request's prompt repeats its own index, so no two
requests share a prefix. The KV prefix cache is off unless asked for (`loadgen replay` of a server
that had it on): then a preempted request finds its own blocks again when it resumes, as in the
engine, at the cost of hashing blocks every step. Each output ends at the trace's length
with an end-of-sequence token. What the policies may know of that length beforehand is
`--output-length` (scheduling/output_length.py): with `oracle` each request's max_tokens is its
true length; with `max-tokens` and `history` it is `--max-tokens`, a limit the same for every
request (default: the workload's longest output), and `history` learns from finished requests.

`--time-limit S` reports the run as the SLAI authors stop theirs: `summary` counts only requests
finished by S (censored), `summary_uncensored` every request, the run continued to the end.
`--seeds K` runs seeds seed..seed+K-1 into DIR/seed_<s>/ and writes DIR/results.json with the
mean over seeds in `summary` and 95% confidence half-widths (Student t) in `summary_ci95`.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from balancer import BALANCERS, WorkerLoad, make_balancer
from engine.messages import SLO, GenerateRequest, LoadReport, SamplingParams
from engine.requests import scheduler_request
from loadgen.args import add_output_arg, add_workload_args, positive_float, positive_int
from loadgen.metrics import (RequestRecord, aggregate, benchmark_duration, client_timeseries, summarize,
                             worker_balance)
from loadgen.report import MAIN_METRICS, plot_run, print_summary, write_results
from loadgen.step_model import PRESETS, MachineSpeed, StepModel, fit, fit_main
from loadgen.workload import build_schedule, clamp_to_context
from scheduling import SCHEDULERS, KVBlockManager, SchedulerConfig, make_scheduler
from scheduling.output_length import BUCKET_EDGES, MODES, bucket, bucket_label
from scheduling.registry import add_knob_flags, knob_values
from scheduling.step_cost import step_features

SAMPLED_TOKEN, EOS_TOKEN = 0, 1  # what a step "samples": any token, then EOS at the trace's length
STALL_STEPS = 100_000  # steps in a row without a token after which a worker counts as livelocked
TIMELINE_POINTS = 200


class SimulationError(RuntimeError):
    """The run cannot complete: a worker stalled or livelocked."""


@dataclass(slots=True, eq=False)
class Track:
    """What the simulator records of one request."""
    index: int
    input_tokens: int
    output_tokens: int
    arrival_s: float  # when it was due
    tbt_slo_ms: float | None
    max_tokens: int  # what the request declares (its true length only under --output-length oracle)
    start_s: float = math.nan  # when it was sent (later than due under --max-concurrency)
    worker: int = -1
    times: list[float] = field(default_factory=list)  # one per output token
    queue_s: float = 0.0
    num_preemptions: int = 0
    done: bool = False


class Worker:
    """One engine worker: scheduler, KV and the step in flight."""

    def __init__(self, index: int, scheduler):
        self.index, self.scheduler = index, scheduler
        self.inbox: list[GenerateRequest] = []  # arrived during the current step
        self.requests_in = 0
        self.plan = None  # the step in flight
        self.sampled: list[int | None] = []
        self.step_s = 0.0
        self.dry_steps = 0
        self.looping = False  # between a step's end and the next step's plan (the model's loop_s)
        self.reports: deque[tuple[float, LoadReport]] = deque()  # (when the balancer sees it, report)
        self.completed = 0
        self.samples: list[tuple[float, int, int, int]] = []  # (t, running, waiting, KV blocks used)


class Simulation:
    def __init__(self, args, schedule: list, model: StepModel, num_kv_blocks: int, max_model_len: int,
                 prefix_caching: bool = False):
        self.args, self.model = args, model
        self.delay_s = args.report_delay_ms / 1e3
        self.rng = np.random.default_rng([args.seed, 5])  # step times drawn from the model's spread
        self.speed = MachineSpeed(model, self.rng)
        config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=max_model_len, eos_token_ids=frozenset({EOS_TOKEN}),
                                 output_length=args.output_length)
        self.workers = [Worker(i, make_scheduler(args.scheduler, config,
                                                 KVBlockManager(num_kv_blocks, args.block_size, prefix_caching),
                                                 knob_values(args, SCHEDULERS, args.scheduler)))
                        for i in range(args.workers)]
        self.balancer = make_balancer(args.balancer, knob_values(args, BALANCERS, args.balancer), args.seed)
        self.loads = [WorkerLoad(i) for i in range(args.workers)]
        # With one worker no decision depends on a report: skip building them.
        self.reporting = args.workers > 1
        self.events: list[tuple[float, int, int, bool]] = []  # (when, sequence number, worker, step end or loop end)
        self.seq = 0
        strict = np.random.default_rng([args.seed, 3]).random(len(schedule)) < args.strict_tbt_frac
        limit = args.max_tokens or max(r.output_tokens for r in schedule)
        self.tracks = [Track(i, r.input_tokens, r.output_tokens, r.arrival_s,
                             args.strict_tbt_ms if strict[i] else args.tbt_slo_ms,
                             r.output_tokens if args.output_length == "oracle" else limit)
                       for i, r in enumerate(schedule)]
        self.held: deque[Track] = deque()  # due, but --max-concurrency requests are in flight
        self.ignore_eos = False  # requests end at EOS (the trace's length); replay sends what the live client did
        self.in_flight = 0

    # ---- events -----------------------------------------------------------------------------------
    def run(self) -> None:
        arrivals = sorted(self.tracks, key=lambda t: t.arrival_s)
        events, i, n = self.events, 0, len(arrivals)
        while i < n or events:
            if events and (i == n or events[0][0] <= arrivals[i].arrival_s):
                now, _, w, step_end = heapq.heappop(events)
                if step_end:
                    self.end_step(self.workers[w], now)
                else:
                    self.next_step(self.workers[w], now)
            else:
                track = arrivals[i]
                i += 1
                if self.args.max_concurrency and self.in_flight >= self.args.max_concurrency:
                    self.held.append(track)
                else:
                    self.send(track, track.arrival_s)
        unfinished = [t for t in self.tracks if not t.done]
        if unfinished:
            stuck = [f"worker {w.index}: {len(w.scheduler.running)} running, {len(w.scheduler.waiting)} waiting"
                     for w in self.workers if w.scheduler.has_work()]
            raise SimulationError(f"{len(unfinished)} of {len(self.tracks)} requests never finished: scheduler "
                                  f"{self.args.scheduler!r} planned an empty step with nothing in flight ("
                                  + "; ".join(stuck) + ")")

    def send(self, track: Track, now: float) -> None:
        """The balancer routes a request; the worker starts a step if it was idle."""
        self.in_flight += 1
        track.start_s = now
        request = GenerateRequest(str(track.index), [track.index] * track.input_tokens,
                                  SamplingParams(max_tokens=track.max_tokens, ignore_eos=self.ignore_eos), now,
                                  slo=SLO(tbt_ms=track.tbt_slo_ms))
        for load, worker in zip(self.loads, self.workers):
            self.deliver_reports(load, worker, now)
        w = self.balancer.choose(request, self.loads)
        self.loads[w].record_sent(request)
        worker = self.workers[w]
        track.worker = w
        worker.inbox.append(request)
        if worker.plan is None and not worker.looping:
            self.take_inbox(worker)
            self.start_step(worker, now)

    def deliver_reports(self, load: WorkerLoad, worker: Worker, now: float) -> None:
        latest = None
        while worker.reports and worker.reports[0][0] <= now:
            latest = worker.reports.popleft()[1]
            self.balancer.on_report(latest)
        if latest is not None:
            load.record_report(latest)

    def take_inbox(self, worker: Worker) -> None:
        """What EngineCore.add_request does, for requests that fit (the schedule was clamped)."""
        for g in worker.inbox:
            worker.scheduler.add(scheduler_request(g, payload=self.tracks[int(g.request_id)]))
        worker.requests_in += len(worker.inbox)
        worker.inbox.clear()

    def start_step(self, worker: Worker, now: float) -> None:
        plan = worker.scheduler.schedule(now)
        if not plan:
            worker.plan = None  # idle, or stalled: the next arrival tries again
            return
        sampled = []
        for c in plan.chunks:
            if c.start + c.num_tokens < c.request.num_tokens:
                sampled.append(None)
            else:  # the trace's length reached: end of sequence
                last = c.request.num_output_tokens + 1 >= c.request.payload.output_tokens
                sampled.append(EOS_TOKEN if last else SAMPLED_TOKEN)
        step_s = self.model.step_seconds(step_features(plan)) * self.model.draw("step", self.rng) * self.speed.at(now)
        if worker.index == 0:
            step_s *= self.args.slow_worker_factor
        worker.plan, worker.sampled, worker.step_s = plan, sampled, step_s
        self.push(now + step_s, worker, True)

    def push(self, when: float, worker: Worker, step_end: bool) -> None:
        heapq.heappush(self.events, (when, self.seq, worker.index, step_end))
        self.seq += 1

    def next_step(self, worker: Worker, now: float) -> None:
        worker.looping = False
        self.take_inbox(worker)
        self.start_step(worker, now)

    def end_step(self, worker: Worker, now: float) -> None:
        s = worker.scheduler
        touched = s.update(worker.plan, worker.sampled, now, worker.step_s)
        finished = 0
        for r in touched:  # every request here got a token: max_tokens >= 1
            track = r.payload
            track.times.append(now)
            if r.finished_time is not None:
                track.done, track.num_preemptions = True, r.num_preemptions
                track.queue_s = r.first_scheduled_time - r.arrival_time
                worker.completed += 1
                finished += 1
        worker.dry_steps = 0 if touched else worker.dry_steps + 1
        if worker.dry_steps > STALL_STEPS:
            raise SimulationError(f"worker {worker.index} ran {STALL_STEPS} steps without producing a token "
                                  f"(scheduler {self.args.scheduler!r} livelocked at t={now:.3f}s)")
        worker.samples.append((now, len(s.running), len(s.waiting), s.kv.num_used_blocks))
        if self.reporting:
            report = LoadReport(worker_id=worker.index, stats=s.stats(), requests_in=worker.requests_in,
                                counters=dict(s.counters), time=now)
            worker.reports.append((now + self.delay_s, report))
        if self.model.loop_s and (s.has_work() or worker.inbox):
            worker.plan, worker.looping = None, True
            self.push(now + self.model.loop_s, worker, False)
        else:  # no work left: the worker waits on its queue, and the next arrival starts a step at once
            self.next_step(worker, now)
        self.in_flight -= finished
        for _ in range(finished):
            if self.held:
                self.send(self.held.popleft(), now)

    # ---- results ----------------------------------------------------------------------------------
    def records(self) -> list[RequestRecord]:
        return [RequestRecord.from_times(t.start_s, t.times, t.times[-1], t.input_tokens, arrival_s=t.arrival_s,
                                         requested_output_tokens=t.output_tokens) for t in self.tracks]

    def server_timeline(self, duration: float) -> dict:
        """Running, waiting and KV use over time, summed (KV: averaged) over workers, as the live
        run's /metrics scrape reports them."""
        grid = np.linspace(0.0, duration, TIMELINE_POINTS + 1)
        running, waiting, kv = np.zeros_like(grid), np.zeros_like(grid), np.zeros_like(grid)
        for w in self.workers:
            if not w.samples:
                continue
            a = np.array(w.samples, dtype=np.float64)
            at = np.searchsorted(a[:, 0], grid, side="right") - 1
            seen = at >= 0
            for total, col in ((running, 1), (waiting, 2), (kv, 3)):
                total[seen] += a[at[seen], col]
        kv /= len(self.workers) * self.workers[0].scheduler.kv.num_blocks
        preemptions = sum(w.scheduler.num_preemptions for w in self.workers)
        return {"available": True, "source": "simulator", "t_s": grid.round(6).tolist(),
                "num_requests_running": running.tolist(), "num_requests_waiting": waiting.tolist(),
                "kv_cache_usage_perc": kv.round(6).tolist(), "num_preemptions": float(preemptions)}

    def summary_extras(self, kv_usage: list[float]) -> dict:
        preemptions = sum(w.scheduler.num_preemptions for w in self.workers)
        done = [t for t in self.tracks if t.done]
        queue_ms = np.array([t.queue_s * 1e3 for t in done])
        peak_kv = max((u for w in self.workers for *_, u in w.samples), default=0)
        extras = {
            "num_preemptions": preemptions,
            "preemption_rate": preemptions / len(done) if done else 0.0,  # per completed request
            "preempted_requests": sum(t.num_preemptions > 0 for t in done),
            "mean_queue_ms": float(queue_ms.mean()) if done else None,
            "p99_queue_ms": float(np.percentile(queue_ms, 99)) if done else None,
            "mean_kv_usage": float(np.mean(kv_usage)),
            "max_kv_usage": peak_kv / self.workers[0].scheduler.kv.num_blocks,
            **worker_balance([w.scheduler.busy_seconds for w in self.workers],
                             [w.scheduler.processed_tokens for w in self.workers]),
            "worker_requests": [w.completed for w in self.workers],
            "worker_preemptions": [w.scheduler.num_preemptions for w in self.workers],
        }
        return extras


def ttft_figures(tracks: list[Track]) -> dict:
    a = np.array([(t.times[0] - t.start_s) * 1e3 for t in tracks])
    if not a.size:
        return {"requests": 0, "mean_ttft_ms": None, "median_ttft_ms": None, "p99_ttft_ms": None}
    return {"requests": int(a.size), "mean_ttft_ms": float(a.mean()), "median_ttft_ms": float(np.median(a)),
            "p99_ttft_ms": float(np.percentile(a, 99))}


def class_figures(tracks: list[Track]) -> dict:
    """TTFT by prompt-length bucket (so starvation of long prompts shows), and per TBT target
    (SLAI's per-request classes) its tail time between tokens and its TTFT."""
    by_bucket = {}
    for b in range(len(BUCKET_EDGES) + 1):
        members = [t for t in tracks if bucket(t.input_tokens) == b]
        if members:
            by_bucket[bucket_label(b)] = ttft_figures(members)
    out = {"ttft_by_prompt": by_bucket}
    tiers: dict[str, dict] = {}
    for target in sorted({t.tbt_slo_ms for t in tracks if t.tbt_slo_ms is not None}):
        members = [t for t in tracks if t.tbt_slo_ms == target]
        gaps = np.concatenate([np.diff(t.times) for t in members] + [[]]) * 1e3
        p99 = float(np.percentile(gaps, 99)) if gaps.size else None
        tiers[f"{target:g}"] = ttft_figures(members) | {"p99_itl_ms": p99, "met": p99 is not None and p99 <= target}
    if tiers:
        out["tbt_tiers"] = tiers
    return out


# ---- the command --------------------------------------------------------------------------------------
def step_model(args) -> StepModel:
    if args.step_model:
        return StepModel.load(args.step_model)
    if args.fit_step_log:
        return fit(args.fit_step_log)[0]
    return PRESETS[args.preset][0]


def simulate(args, console: Console | None = None) -> dict:
    """Simulate the run `args` describe (every seed of --seeds); write DIR/results.json and plots;
    return the results."""
    if args.seeds > 1:
        return simulate_seeds(args, console)
    return simulate_one(args, console)


def simulate_one(args, console: Console | None = None) -> dict:
    console = console or Console()
    model = step_model(args)
    _, preset_kv, preset_len = PRESETS[args.preset]
    kv_tokens = args.kv_tokens or preset_kv
    num_blocks = kv_tokens // args.block_size
    # As the engine does: no sequence may outgrow the whole pool.
    max_model_len = min(args.max_model_len or preset_len, num_blocks * args.block_size)
    schedule = build_schedule(args)
    if not schedule:
        raise SimulationError("the workload has no requests")
    if any(r.input_tokens < 1 for r in schedule):
        raise SimulationError("the simulator needs prompt lengths: give --tokenizer for a JSONL workload")
    clamped = 0
    if args.clamp:
        schedule, clamped = clamp_to_context(schedule, max_model_len)
    elif any(r.input_tokens >= max_model_len for r in schedule):
        raise SimulationError(f"a prompt does not fit the context of {max_model_len} tokens (drop --no-clamp)")
    sim = Simulation(args, schedule, model, num_blocks, max_model_len)
    wall = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - wall
    records = sim.records()
    duration = benchmark_duration(records)
    server = sim.server_timeline(duration)
    extras = sim.summary_extras(server["kv_cache_usage_perc"]) | {"simulation_wall_s": wall}

    def summary_of(keep: list[bool]) -> dict:
        kept = [r for r, k in zip(records, keep) if k]
        out = summarize(kept, benchmark_duration(kept), args.slo_ttft_ms, args.slo_tpot_ms)
        return out | class_figures([t for t, k in zip(sim.tracks, keep) if k]) | extras

    summary = summary_of([True] * len(records))
    sections = {}
    if args.time_limit is not None:
        # As the SLAI authors count: only requests finished by the limit; the rest are censored.
        sections["summary_uncensored"] = summary
        summary = summary_of([t.times[-1] <= args.time_limit for t in sim.tracks])
        summary["censored_requests"] = len(records) - summary["completed"]
    config = {**vars(args), "command": "simulate", "step_model": dataclasses.asdict(model), "kv_tokens": kv_tokens,
              "num_kv_blocks": num_blocks, "max_model_len": max_model_len, "clamped_requests": clamped,
              "num_requests_sent": len(schedule), "max_tokens": sim.tracks[0].max_tokens
              if args.output_length != "oracle" else None,
              "scheduler_knobs": dataclasses.asdict(sim.workers[0].scheduler.knobs),
              "balancer_knobs": dataclasses.asdict(sim.balancer.knobs)}
    rows = [r.as_dict() | {"worker": t.worker, "num_preemptions": t.num_preemptions,
                           "queue_ms": round(t.queue_s * 1e3, 3), "tbt_slo_ms": t.tbt_slo_ms}
            for r, t in zip(records, sim.tracks)]
    timeseries = client_timeseries(records, duration)
    write_results(args.output, summary, [] if args.summary_only else rows, config, timeseries, server, sections)
    results = {"summary": summary, "requests": rows, "config": config, "timeseries": timeseries, "server": server,
               **sections}
    if not args.summary_only:
        plot_run(args.output, results)
    print_summary(summary, console, title=f"Simulated: {args.scheduler}, {args.workers} x {args.balancer}"
                  + (f" (censored at {args.time_limit:g} s)" if args.time_limit is not None else ""))
    console.print(simulator_table(summary))
    return results


def simulate_seeds(args, console: Console | None = None) -> dict:
    """One run per seed into DIR/seed_<s>/; DIR/results.json holds their mean and 95% intervals."""
    console = console or Console()
    out = Path(args.output)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        console.rule(f"seed {seed}")
        runs.append(simulate_one(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": 1,
                                                       "output": str(out / f"seed_{seed}")}), console))
    sections = ["summary"] + (["summary_uncensored"] if args.time_limit is not None else [])
    results = {"config": {**runs[0]["config"], "seed": args.seed, "seeds": args.seeds, "output": str(out)}}
    for name in sections:
        results[name], results[f"{name}_ci95"] = aggregate([r[name] for r in runs])
    results["seed_summaries"] = [r["summary"] for r in runs]
    extra = {k: v for k, v in results.items() if k not in ("summary", "config")}
    write_results(out, results["summary"], [], results["config"], {}, {"available": False}, extra)
    console.print(seeds_table(results["summary"], results["summary_ci95"], args.seeds))
    return results | {"requests": []}


def seeds_table(mean: dict, ci: dict, k: int) -> Table:
    table = Table(title=f"Mean over {k} seeds ± 95% confidence half-width")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for label, key, _ in MAIN_METRICS + [("Preemptions per request", "preemption_rate", "")]:
        if isinstance(mean.get(key), float | int):
            table.add_row(label, f"{mean[key]:.4g} ± {ci[key]:.2g}")
    return table


def simulator_table(s: dict) -> Table:
    table = Table(title="Simulator")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    rows = [("Preemptions", f"{s['num_preemptions']:d}"),
            ("Preemptions per request", f"{s['preemption_rate']:.4f}"),
            ("Requests preempted", f"{s['preempted_requests']:d}"),
            ("Mean / P99 queue time (ms)", f"{s['mean_queue_ms']:.2f} / {s['p99_queue_ms']:.2f}"),
            ("Mean / max KV usage", f"{s['mean_kv_usage']:.1%} / {s['max_kv_usage']:.1%}")]
    for target, tier in s.get("tbt_tiers", {}).items():
        rows.append((f"P99 ITL, TBT target {target} ms", f"{tier['p99_itl_ms']:.2f} ({'met' if tier['met'] else 'missed'})"))
    rows.append(("Simulation wall time (s)", f"{s['simulation_wall_s']:.2f}"))
    for row in rows:
        table.add_row(*row)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    e = p.add_argument_group("engine")
    e.add_argument("--scheduler", default="fcfs", choices=sorted(SCHEDULERS))
    e.add_argument("--balancer", default="round-robin", choices=sorted(BALANCERS))
    e.add_argument("--workers", type=positive_int, default=1)
    model = e.add_mutually_exclusive_group()
    model.add_argument("--step-model", metavar="FILE", help='JSON {"c0": .., "c1": .., "c2": .., "c3": ..} (what simulate fit writes)')
    model.add_argument("--fit-step-log", metavar="FILE",
                       help="fit the step model to a step log (a --step-log directory or one JSONL file)")
    e.add_argument("--preset", choices=sorted(PRESETS), default="h100-llama3-8b",
                   help="step model (unless --step-model/--fit-step-log), KV size and context length")
    e.add_argument("--kv-tokens", type=positive_int, help="KV cache per worker in tokens (default: the preset's)")
    e.add_argument("--block-size", type=positive_int, default=16)
    e.add_argument("--max-num-seqs", type=positive_int, default=256)
    e.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    e.add_argument("--report-delay-ms", type=float, default=1.0, help="load report latency to the balancer")
    e.add_argument("--slow-worker-factor", type=positive_float, default=1.0,
                   help="worker 0's steps take F times as long (a heterogeneous or throttled replica)")
    e.add_argument("--tbt-slo-ms", type=positive_float, help="every request's TBT target (SLAI reads it)")
    e.add_argument("--strict-tbt-frac", type=float, default=0.0,
                   help="fraction of requests (seeded) with the strict TBT target instead")
    e.add_argument("--strict-tbt-ms", type=positive_float, default=100.0)
    e.add_argument("--output-length", choices=MODES, default="history",
                   help="what policies may know of output lengths (scheduling/output_length.py); "
                        "oracle sends each request's true length as its max_tokens")
    e.add_argument("--max-tokens", type=positive_int,
                   help="max_tokens of every request unless --output-length oracle (default: the workload's "
                        "longest output)")
    r = p.add_argument_group("run")
    r.add_argument("--time-limit", type=positive_float, metavar="S",
                   help="report only requests finished by S seconds (as the SLAI authors stop their runs); "
                        "the run continues to the end for summary_uncensored")
    r.add_argument("--seeds", type=positive_int, default=1,
                   help="run seeds --seed .. --seed+K-1 and report the mean and 95%% confidence half-widths")
    r.add_argument("--summary-only", action="store_true",
                   help="write no per-request rows and no plots (sweeps and many seeds: results.json stays small)")
    add_knob_flags(p, SCHEDULERS)
    add_knob_flags(p, BALANCERS)
    add_workload_args(p)
    add_output_arg(p)
    return p


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["fit"]:
            return fit_main(argv[1:])
        results = simulate(build_parser().parse_args(argv))
    except (SimulationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if results["summary"]["failed"] == 0 else 1
