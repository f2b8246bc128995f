"""`python -m loadgen simulate`: the real scheduler and balancer policies on a step-time model, in
virtual time, writing the same results.json and plots as a live run.

    python -m loadgen simulate --scheduler fcfs [--balancer sal --workers 4]
        [--preset h100-llama3-8b | --step-model FILE | --fit-step-log FILE] [--kv-tokens K]
        --workload PATH.csv --rate R --output DIR
    python -m loadgen simulate fit --step-log DIR [--results RUN_DIR] --output MODEL.json

Discrete events in virtual time. Each worker is a real Scheduler over a real KVBlockManager; a step
takes what the step model (loadgen/step_model.py) charges for the work scheduling/step_cost.py
counts in its plan. Requests reach the balancer at their arrival
times, and the real balancer policy routes them over real WorkerLoads. A worker does what the
worker process does: after each step it sends a LoadReport built from its scheduler's stats(),
which the balancer sees `--report-delay-ms` later, then it takes in the requests that arrived
during the step and plans the next one. So the balancer decides on stale reports plus its own
exact record of what it sent since, as in the real process. Requests reach a worker instantly.

A trace gives token counts, not tokens. Each request's prompt repeats its own index, so no two
requests share a prefix, and the KV prefix cache is off: it could never hit, and hashing every
block every step would be the simulator's largest cost. Outputs run to their length (ignore_eos).
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

import numpy as np
from rich.console import Console
from rich.table import Table

from balancer import BALANCERS, WorkerLoad, make_balancer
from engine.messages import SLO, GenerateRequest, LoadReport, SamplingParams
from loadgen.args import add_output_arg, add_workload_args, positive_float, positive_int
from loadgen.step_model import PRESETS, StepModel, fit, fit_main
from loadgen.metrics import RequestRecord, benchmark_duration, client_timeseries, summarize, worker_balance
from loadgen.report import plot_run, print_summary, write_results
from loadgen.workload import build_schedule, clamp_to_context
from scheduling import SCHEDULERS, KVBlockManager, Request, SchedulerConfig, make_scheduler
from scheduling.registry import add_knob_flags, knob_values
from scheduling.step_cost import step_features

SAMPLED_TOKEN = 0  # what every step "samples": outputs end by length, so the id does not matter
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
        self.reports: deque[tuple[float, LoadReport]] = deque()  # (when the balancer sees it, report)
        self.completed = 0
        self.samples: list[tuple[float, int, int, int]] = []  # (t, running, waiting, KV blocks used)


class Simulation:
    def __init__(self, args, schedule: list, model: StepModel, num_kv_blocks: int, max_model_len: int):
        self.args, self.model = args, model
        self.delay_s = args.report_delay_ms / 1e3
        config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=max_model_len)
        self.workers = [Worker(i, make_scheduler(args.scheduler, config,
                                                 KVBlockManager(num_kv_blocks, args.block_size, False),
                                                 knob_values(args, SCHEDULERS, args.scheduler)))
                        for i in range(args.workers)]
        self.balancer = make_balancer(args.balancer, knob_values(args, BALANCERS, args.balancer), args.seed)
        self.loads = [WorkerLoad(i) for i in range(args.workers)]
        # With one worker no decision depends on a report: skip building them.
        self.reporting = args.workers > 1
        self.events: list[tuple[float, int, int]] = []  # (step end, sequence number, worker)
        self.seq = 0
        strict = np.random.default_rng([args.seed, 3]).random(len(schedule)) < args.strict_tbt_frac
        self.tracks = [Track(i, r.input_tokens, r.output_tokens, r.arrival_s,
                             args.strict_tbt_ms if strict[i] else args.tbt_slo_ms)
                       for i, r in enumerate(schedule)]
        self.held: deque[Track] = deque()  # due, but --max-concurrency requests are in flight
        self.in_flight = 0

    # ---- events -----------------------------------------------------------------------------------
    def run(self) -> None:
        arrivals = sorted(self.tracks, key=lambda t: t.arrival_s)
        events, i, n = self.events, 0, len(arrivals)
        while i < n or events:
            if events and (i == n or events[0][0] <= arrivals[i].arrival_s):
                now, _, w = heapq.heappop(events)
                self.end_step(self.workers[w], now)
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
                                  SamplingParams(max_tokens=track.output_tokens, ignore_eos=True), now,
                                  slo=SLO(tbt_ms=track.tbt_slo_ms))
        for load, worker in zip(self.loads, self.workers):
            self.deliver_reports(load, worker, now)
        w = self.balancer.choose(request, self.loads)
        self.loads[w].record_sent(request)
        worker = self.workers[w]
        track.worker = w
        worker.inbox.append(request)
        if worker.plan is None:
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
            track = self.tracks[int(g.request_id)]
            worker.scheduler.add(Request(g.request_id, g.prompt_token_ids, g.sampling.max_tokens, g.arrival_time,
                                         ignore_eos=True, tbt_slo_s=None if g.slo.tbt_ms is None else g.slo.tbt_ms / 1e3,
                                         payload=track))
        worker.requests_in += len(worker.inbox)
        worker.inbox.clear()

    def start_step(self, worker: Worker, now: float) -> None:
        plan = worker.scheduler.schedule(now)
        if not plan:
            worker.plan = None  # idle, or stalled: the next arrival tries again
            return
        sampled = [SAMPLED_TOKEN if c.samples else None for c in plan.chunks]
        step_s = self.model.step_seconds(step_features(plan))
        worker.plan, worker.sampled, worker.step_s = plan, sampled, step_s
        heapq.heappush(self.events, (now + step_s, self.seq, worker.index))
        self.seq += 1

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
        self.take_inbox(worker)
        self.start_step(worker, now)
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
        # Tail time between tokens per TBT target (SLAI's per-request targets).
        tiers: dict[str, dict] = {}
        for target in sorted({t.tbt_slo_ms for t in done if t.tbt_slo_ms is not None}):
            gaps = np.concatenate([np.diff(t.times) for t in done if t.tbt_slo_ms == target] + [[]]) * 1e3
            p99 = float(np.percentile(gaps, 99)) if gaps.size else None
            tiers[f"{target:g}"] = {"requests": sum(t.tbt_slo_ms == target for t in done), "p99_itl_ms": p99,
                                    "met": p99 is not None and p99 <= target}
        if tiers:
            extras["tbt_tiers"] = tiers
        return extras


# ---- the command --------------------------------------------------------------------------------------
def step_model(args) -> StepModel:
    if args.step_model:
        return StepModel.load(args.step_model)
    if args.fit_step_log:
        return fit(args.fit_step_log)[0]
    return PRESETS[args.preset][0]


def simulate(args, console: Console | None = None) -> dict:
    """Simulate the run `args` describe; write DIR/results.json and plots; return the results."""
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
    summary = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    server = sim.server_timeline(duration)
    summary |= sim.summary_extras(server["kv_cache_usage_perc"])
    summary["simulation_wall_s"] = wall
    config = {**vars(args), "command": "simulate", "step_model": dataclasses.asdict(model), "kv_tokens": kv_tokens,
              "num_kv_blocks": num_blocks, "max_model_len": max_model_len, "clamped_requests": clamped,
              "num_requests_sent": len(schedule),
              "scheduler_knobs": dataclasses.asdict(sim.workers[0].scheduler.knobs),
              "balancer_knobs": dataclasses.asdict(sim.balancer.knobs)}
    rows = [r.as_dict() | {"worker": t.worker, "num_preemptions": t.num_preemptions,
                           "queue_ms": round(t.queue_s * 1e3, 3), "tbt_slo_ms": t.tbt_slo_ms}
            for r, t in zip(records, sim.tracks)]
    timeseries = client_timeseries(records, duration)
    write_results(args.output, summary, rows, config, timeseries, server)
    results = {"summary": summary, "requests": rows, "config": config, "timeseries": timeseries, "server": server}
    plot_run(args.output, results)
    print_summary(summary, console, title=f"Simulated: {args.scheduler}, {args.workers} x {args.balancer}")
    console.print(simulator_table(summary))
    return results


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
    e.add_argument("--tbt-slo-ms", type=positive_float, help="every request's TBT target (SLAI reads it)")
    e.add_argument("--strict-tbt-frac", type=float, default=0.0,
                   help="fraction of requests (seeded) with the strict TBT target instead")
    e.add_argument("--strict-tbt-ms", type=positive_float, default=100.0)
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
