"""A live run: build the schedule, warm up, send each request on time, then summarize and report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadgen.args import add_client_args, add_output_arg, add_workload_args
from loadgen.client import Target, send
from loadgen.metrics import RequestRecord, benchmark_duration, client_timeseries, summarize
from loadgen.prompts import PromptMaker, probe_vocabulary
from loadgen.report import plot_run, print_summary, write_results
from loadgen.scrape import MetricsPoller
from loadgen.transport import HTTP11Transport
from loadgen.workload import WorkloadRequest, build_schedule, clamp_to_context

# Event-loop lag above this means the client itself was a bottleneck and latencies include its delay.
LOOP_LAG_WARN_MS = 50.0
_LAG_PERIOD_S = 0.01


def server_root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def run(args, console: Console | None = None) -> dict:
    """Run a benchmark as `args` describe it; write DIR/results.json and plots; return the results."""
    console = console or Console()
    _raise_open_file_limit()
    try:
        import uvloop  # lower per-chunk overhead than the default loop when thousands of streams run

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        results = runner.run(_run(args, console))
    plot_run(args.output, results)
    print_summary(results["summary"], console)
    lag = results["summary"]["client_max_loop_lag_ms"]
    if lag > LOOP_LAG_WARN_MS:
        console.print(f"[yellow]warning: the client's event loop lagged up to {lag:.0f} ms; "
                      "latencies include client delay (use fewer requests in flight or a faster machine)")
    return results


def _raise_open_file_limit() -> None:
    # Each stream holds a socket; the default soft limit (often 1024) is too low for thousands.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(args, console: Console) -> dict:
    schedule = build_schedule(args)
    if not schedule:
        raise SystemExit("error: the workload has no requests")
    # identity: a compressed event stream would arrive in bursts, not token by token.
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    root = server_root(args.base_url)
    # One connection per request in flight: --max-concurrency (the semaphore below) bounds them.
    transport = HTTP11Transport()
    async with httpx.AsyncClient(headers=headers, transport=transport, timeout=args.request_timeout) as http:
        model, listed_max_len = await _discover_model(http, args.base_url, args.model)
        vocab = await probe_vocabulary(http, root, model, args.tokenizer)
        max_model_len = args.max_model_len or vocab.max_model_len or listed_max_len
        clamped = 0
        if args.clamp and max_model_len:
            schedule, clamped = clamp_to_context(schedule, max_model_len)
        chat = args.endpoint == "chat"
        target = Target(f"{args.base_url.rstrip('/')}/{'chat/completions' if chat else 'completions'}",
                        model, chat, args.ignore_eos, args.extra_body)
        make_prompt = PromptMaker(vocab, token_ids=not chat and vocab.token_pool is not None, seed=args.seed)
        if vocab.source == "none" and any(r.prompt is None for r in schedule):
            console.print("[yellow]warning: no /tokenize on the server and no --tokenizer: "
                          "prompt lengths are approximate")
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()

        async def one(index: int, request: WorkloadRequest, t0: float) -> RequestRecord:
            async with gate:
                body = target.body(make_prompt(index, request), request.output_tokens)
                return await send(http, target, body, request.input_tokens, t0, arrival_s=request.arrival_s,
                                  requested_output_tokens=request.output_tokens)

        if args.warmup:
            # Indexes past the schedule's give fresh prompts, so warm-up leaves nothing in the prefix
            # cache that the measured requests could reuse.
            t0, n = time.perf_counter(), len(schedule)
            await asyncio.gather(*(one(n + i, schedule[i % n], t0) for i in range(args.warmup)))

        server_info = await _server_info(http, root)
        poller = MetricsPoller(f"{root}/metrics", args.metrics_interval, headers)
        lags: list[float] = []
        t0 = time.perf_counter()
        # Send times are seconds after t0; these place t0 on the clocks the server's step log uses.
        clocks = {"t0_monotonic": time.monotonic() - (time.perf_counter() - t0), "t0_wall": time.time()}
        await poller.start(t0)
        lag_task = asyncio.create_task(_watch_loop_lag(lags))
        records = await _dispatch(schedule, one, t0)
        lag_task.cancel()
        server = await poller.stop()

    duration = benchmark_duration(records)
    summary = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    summary["client_max_loop_lag_ms"] = 1e3 * max(lags, default=0.0)
    summary["client_p99_loop_lag_ms"] = 1e3 * float(np.percentile(lags, 99)) if lags else 0.0
    summary.update(poller.load_balance())
    config = {
        **vars(args),
        "api_key": "<redacted>" if args.api_key else None,
        "model": model,
        "url": target.url,
        "max_model_len": max_model_len,
        "clamped_requests": clamped,
        "tokenizer_source": vocab.source,
        "prompt_kind": "token_ids" if make_prompt.token_ids else "text",
        "num_requests_sent": len(schedule),
        "server_info": server_info,
        **clocks,
    }
    timeseries = client_timeseries(records, duration)
    write_results(args.output, summary, records, config, timeseries, server)
    # Callers and plots get the records as a results.json holds them: plain dicts.
    requests = [r.as_dict() for r in records]
    return {"summary": summary, "requests": requests, "config": config, "timeseries": timeseries, "server": server}


async def _dispatch(schedule: list[WorkloadRequest], one, t0: float) -> list[RequestRecord]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("in flight {task.fields[in_flight]}  failed {task.fields[failed]}"))
    with Progress(*columns, console=Console(stderr=True), refresh_per_second=4) as progress:
        bar = progress.add_task("requests", total=len(schedule), in_flight=0, failed=0)
        state = {"in_flight": 0, "failed": 0}

        # "in flight" counts from the send time on, including any wait for a --max-concurrency slot.
        async def tracked(index: int, request: WorkloadRequest) -> RequestRecord:
            state["in_flight"] += 1
            record = await one(index, request, t0)
            state["in_flight"] -= 1
            state["failed"] += not record.success
            progress.update(bar, advance=1, **state)
            return record

        tasks = []
        for index, request in enumerate(schedule):
            delay = t0 + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tracked(index, request)))
        return list(await asyncio.gather(*tasks))


async def _watch_loop_lag(lags: list[float]) -> None:
    """How late the loop wakes a sleeper: a direct measure of client overload."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(_LAG_PERIOD_S)
        lags.append(time.perf_counter() - before - _LAG_PERIOD_S)


async def _server_info(http: httpx.AsyncClient, root: str) -> dict | None:
    """The server's settings (halffull's /server_info), which `loadgen replay` simulates; None elsewhere."""
    try:
        response = await http.get(f"{root}/server_info")
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def _discover_model(http: httpx.AsyncClient, base_url: str, model: str | None) -> tuple[str, int | None]:
    """The model to ask for (--model, else the first one listed) and the context length listed for it."""
    try:
        response = await http.get(f"{base_url.rstrip('/')}/models")
        listed = response.json()["data"] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError):
        listed = []
    if model is None:
        if not listed:
            raise SystemExit(f"error: no --model given and {base_url}/models lists none")
        model = listed[0]["id"]
    entry = next((m for m in listed if m.get("id") == model), {})
    return model, entry.get("max_model_len")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen",
        description="Benchmark an OpenAI-compatible server. Other commands: "
                    "'python -m loadgen compare|sweep|simulate --help'.",
    )
    add_client_args(parser)
    add_workload_args(parser)
    add_output_arg(parser)
    results = run(parser.parse_args(argv))
    return 0 if results["summary"]["completed"] else 1
