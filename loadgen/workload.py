"""What to send (workloads) and when to send it (arrival processes).

Shared by the live benchmark and the simulator: nothing here talks to a server. A workload is a list
of `WorkloadRequest`s in send order; `build_schedule(args)` pairs it with arrival times.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

# Synthetic workloads have no natural size; this matches `vllm bench serve`'s default prompt count.
DEFAULT_SYNTHETIC_REQUESTS = 1000


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    input_tokens: int
    output_tokens: int
    # A ready prompt (JSONL workloads); None means "build one of input_tokens tokens".
    prompt: str | list[int] | None = None
    # Seconds after the benchmark start. From load_workload: the trace's own offset (or None);
    # from build_schedule: the time this request is to be sent.
    arrival_s: float | None = None


def workload_kind(workload: str) -> str:
    if workload == "synthetic":
        return "synthetic"
    suffix = Path(workload).suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return suffix[1:]
    raise ValueError(f"--workload must be 'synthetic', a .csv trace or a .jsonl file, not {workload!r}")


def load_workload(args) -> list[WorkloadRequest]:
    """The requests of `args.workload`, in order, capped at `args.num_requests`."""
    kind = workload_kind(args.workload)
    if kind == "synthetic":
        count = args.num_requests if args.num_requests is not None else _synthetic_count(args)
        return synthetic_workload(
            count, args.input_len, args.output_len, args.length_dist, args.range_ratio,
            args.lognormal_sigma, args.seed,
        )
    if kind == "csv":
        requests = read_trace(args.workload)
        if is_length_only(requests):
            return sample_rows(requests, args.num_requests, args.seed)
        return trace_window(requests, args.num_requests, args.seed)
    requests = read_jsonl(args.workload, args.output_len, args.tokenizer)
    return requests if args.num_requests is None else requests[: args.num_requests]


def is_length_only(requests: list[WorkloadRequest]) -> bool:
    """A trace of lengths without timestamps (e.g. ShareGPT's): arrivals must be drawn."""
    return bool(requests) and requests[0].arrival_s is None


def sample_rows(requests: list[WorkloadRequest], n: int | None, seed: int) -> list[WorkloadRequest]:
    """`n` rows drawn without replacement, a different draw per seed (all rows, shuffled, for None)."""
    rng = np.random.default_rng([seed, 2])
    picked = rng.permutation(len(requests))[: len(requests) if n is None else n]
    return [requests[i] for i in picked]


def trace_window(requests: list[WorkloadRequest], n: int | None, seed: int) -> list[WorkloadRequest]:
    """Seed k replays the trace's k-th window of `n` requests (the whole trace for n = None, seed 0)."""
    if n is None:
        if seed:
            raise ValueError("a timestamped trace needs --num-requests to pick a window by --seed")
        return requests
    start = seed * n
    if start + n > len(requests):
        raise ValueError(f"--seed {seed} with --num-requests {n} needs {start + n} requests; the trace has "
                         f"{len(requests)}")
    return requests[start:start + n]


def _synthetic_count(args) -> int:
    # With only --duration, make exactly as many requests as the arrival process fits in it.
    if args.duration is not None and math.isfinite(args.rate) and not args.replay_timestamps:
        return len(arrival_times(None, args.rate, args.burstiness, args.seed, duration_s=args.duration))
    return DEFAULT_SYNTHETIC_REQUESTS


def synthetic_workload(
    n: int, input_len: int, output_len: int, length_dist: str = "fixed", range_ratio: float = 0.5,
    lognormal_sigma: float = 0.5, seed: int = 0,
) -> list[WorkloadRequest]:
    # A stream separate from the arrivals' so that changing the length distribution keeps the arrivals.
    rng = np.random.default_rng([seed, 1])
    inputs = synthetic_lengths(n, input_len, length_dist, range_ratio, lognormal_sigma, rng)
    outputs = synthetic_lengths(n, output_len, length_dist, range_ratio, lognormal_sigma, rng)
    return [WorkloadRequest(int(i), int(o)) for i, o in zip(inputs, outputs)]


def synthetic_lengths(
    n: int, mean: int, dist: str, range_ratio: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """n lengths ≥ 1 with the given mean: fixed, uniform in mean·[1−r, 1+r], or lognormal(σ)."""
    if dist == "fixed":
        return np.full(n, max(1, mean), dtype=np.int64)
    if dist == "uniform":
        low = max(1, math.floor(mean * (1 - range_ratio)))
        high = max(low, math.ceil(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=n)
    if dist == "lognormal":
        # mu chosen so that the distribution's mean (not its median) is `mean`.
        mu = math.log(max(1, mean)) - sigma**2 / 2
        return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=n))).astype(np.int64)
    raise ValueError(f"unknown length distribution {dist!r}")


LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")  # a length-only trace (the SLAI authors' ShareGPT)


def read_trace(path: str | Path) -> list[WorkloadRequest]:
    """An Azure LLM inference trace (2023): TIMESTAMP, ContextTokens, GeneratedTokens; or a trace of
    lengths only: num_prefill_tokens, num_decode_tokens (arrival_s None)."""
    requests = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if set(LENGTH_COLUMNS) <= columns:
            return [WorkloadRequest(max(1, int(row["num_prefill_tokens"])), max(1, int(row["num_decode_tokens"])))
                    for row in reader]
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - columns
        if missing:
            raise ValueError(f"{path}: missing trace columns {sorted(missing)} (or give {', '.join(LENGTH_COLUMNS)})")
        first = None
        for row in reader:
            # fromisoformat takes the trace's 7 fractional digits (keeping microseconds); subtracting
            # naive datetimes avoids the local time zone entirely.
            stamp = datetime.fromisoformat(row["TIMESTAMP"].strip())
            first = first or stamp
            requests.append(WorkloadRequest(
                input_tokens=max(1, int(row["ContextTokens"])),
                output_tokens=max(1, int(row["GeneratedTokens"])),
                arrival_s=(stamp - first).total_seconds(),
            ))
    return requests


def read_jsonl(path: str | Path, default_output: int, tokenizer_dir: str | None = None) -> list[WorkloadRequest]:
    """One {"prompt": str, "output_tokens"|"max_tokens": int} object per line.

    Prompt lengths are counted with the local tokenizer when one is given; otherwise they stay 0 here
    and the live run takes them from the server's usage.
    """
    tok = None
    if tokenizer_dir:
        from loadgen.prompts import load_local_tokenizer

        tok = load_local_tokenizer(tokenizer_dir)
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt'")
            output = obj.get("output_tokens", obj.get("max_tokens", default_output))
            prompt = obj["prompt"]
            length = len(tok.encode(prompt, add_special_tokens=False)) if tok else 0
            requests.append(WorkloadRequest(length, int(output), prompt))
    return requests


def arrival_times(
    n: int | None, rate: float = math.inf, burstiness: float = 1.0, seed: int = 0,
    replay_timestamps: bool = False, time_scale: float = 1.0, trace_s: list[float] | None = None,
    duration_s: float | None = None, max_gap_s: float | None = None,
) -> list[float]:
    """Send times in seconds from the start, the first at 0.

    - replay_timestamps: the trace's offsets `trace_s` multiplied by `time_scale` (0.5 = twice as fast);
    - rate = inf: everything at once;
    - otherwise a gamma renewal process with mean gap 1/rate and shape `burstiness`
      (1 = Poisson; < 1 burstier, > 1 smoother: the gaps' coefficient of variation is 1/√burstiness),
      each gap cut to at most `max_gap_s` when given (the SLAI authors cut Poisson gaps at 3× the mean).
    Times at or after `duration_s` are dropped; n = None (needs a finite rate and a duration) means
    "as many as fit in the duration".
    """
    if replay_timestamps:
        if trace_s is None or n is None or len(trace_s) < n or any(t is None for t in trace_s[:n]):
            raise ValueError("--replay-timestamps needs a trace with a timestamp for every request")
        times = [(t - trace_s[0]) * time_scale for t in trace_s[:n]]
    elif math.isinf(rate):
        if n is None:
            raise ValueError("--rate inf needs a request count")
        times = [0.0] * n
    else:
        times = _renewal_times(n, rate, burstiness, seed, duration_s, max_gap_s)
    if duration_s is not None:
        times = [t for t in times if t < duration_s]
    return times


def _renewal_times(n: int | None, rate: float, burstiness: float, seed: int, duration_s: float | None,
                   max_gap_s: float | None = None) -> list[float]:
    if n is None and duration_s is None:
        raise ValueError("an arrival process at a finite rate needs a request count or a duration")
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate * burstiness)
    # Drawn in fixed batches so a count-limited and a duration-limited call see the same stream.
    chunks, total, last = [np.zeros(1)], 1, 0.0
    while (n is not None and total < n) or (n is None and last < duration_s):
        gaps = rng.gamma(burstiness, scale, size=4096)
        batch = last + np.cumsum(gaps if max_gap_s is None else np.minimum(gaps, max_gap_s))
        chunks.append(batch)
        total, last = total + batch.size, float(batch[-1])
    times = np.concatenate(chunks)
    return times[:n].tolist() if n is not None else times.tolist()


def clamp_to_context(requests: list[WorkloadRequest], max_model_len: int) -> tuple[list[WorkloadRequest], int]:
    """Shrink requests whose prompt + output exceed the model's context; returns (requests, how many).

    The output length is kept when possible (it is what the benchmark exercises), the prompt shortened;
    a ready text prompt cannot be shortened, so only its output is.
    """
    clamped, changed = [], 0
    for r in requests:
        if r.input_tokens + r.output_tokens > max_model_len:
            changed += 1
            if isinstance(r.prompt, str):
                r = replace(r, output_tokens=max(1, max_model_len - r.input_tokens))
            else:
                output = min(r.output_tokens, max_model_len - 1)
                input_tokens = max_model_len - output
                prompt = r.prompt[:input_tokens] if r.prompt is not None else None
                r = replace(r, input_tokens=input_tokens, output_tokens=output, prompt=prompt)
        clamped.append(r)
    return clamped, changed


def build_schedule(args) -> list[WorkloadRequest]:
    """The workload with each request's send time in `arrival_s`."""
    requests = load_workload(args)
    factor = args.max_gap_factor
    if factor is None and workload_kind(args.workload) == "csv" and is_length_only(requests):
        factor = 3.0  # drawn as the SLAI authors draw arrivals for their length-only ShareGPT trace
    times = arrival_times(
        len(requests), args.rate, args.burstiness, args.seed, args.replay_timestamps, args.time_scale,
        trace_s=[r.arrival_s for r in requests] if args.replay_timestamps else None,
        duration_s=args.duration, max_gap_s=factor / args.rate if factor and math.isfinite(args.rate) else None,
    )
    return [replace(r, arrival_s=t) for r, t in zip(requests, times)]
