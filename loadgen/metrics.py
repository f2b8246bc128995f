"""Per-request records and the run summary, with the definitions of `vllm bench serve`.

- TTFT: request start to the first streamed chunk that carries output.
- TPOT: (E2E − TTFT) / (output tokens − 1), per request with more than one output token.
- ITL: every gap between successive output chunks, pooled over all requests.
- E2E latency (e2el): request start to the end of its stream.
- Throughputs divide by the benchmark duration, first send to last completion.
- Goodput: requests/s that met every SLO given; a one-token request has no TPOT and passes that SLO.
Only successful requests enter the statistics; failed ones are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p90", "p99")


@dataclass(slots=True)
class RequestRecord:
    input_tokens: int
    output_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None  # for a failed request: time until it failed
    itl_ms: list[float] = field(default_factory=list)
    success: bool = False
    error: str | None = None
    start_s: float = 0.0  # when it was sent, seconds after the benchmark start
    arrival_s: float | None = None  # when it was due; start_s − arrival_s is time spent waiting to send
    requested_output_tokens: int | None = None
    usage_output_tokens: int | None = None  # completion_tokens as the server reported it

    @classmethod
    def from_times(
        cls, start_s: float, chunk_times_s: list[float], end_s: float, input_tokens: int,
        output_tokens: int | None = None, **fields,
    ) -> RequestRecord:
        """A successful request from its send time, the arrival times of its output chunks and its
        end, all in seconds on one clock (wall or virtual). output_tokens defaults to the chunk count."""
        output_tokens = len(chunk_times_s) if output_tokens is None else output_tokens
        ttft = (chunk_times_s[0] - start_s) * 1e3
        e2el = (end_s - start_s) * 1e3
        return cls(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            ttft_ms=round(ttft, 3),
            tpot_ms=round((e2el - ttft) / (output_tokens - 1), 3) if output_tokens > 1 else None,
            e2el_ms=round(e2el, 3),
            itl_ms=[round((b - a) * 1e3, 3) for a, b in zip(chunk_times_s, chunk_times_s[1:])],
            success=True,
            start_s=round(start_s, 6),
            **fields,
        )

    def as_dict(self) -> dict:
        # Shallow, unlike dataclasses.asdict, which deep-copies every ITL list.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def benchmark_duration(records: list[RequestRecord]) -> float:
    """First send to last completion, in seconds."""
    ends = [r.start_s + r.e2el_ms / 1e3 for r in records if r.e2el_ms is not None]
    return max(ends) - min(r.start_s for r in records) if ends else 0.0


def summarize(
    records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    ok = [r for r in records if r.success]
    total_input = sum(r.input_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if _meets_slos(r, slo_ttft_ms, slo_tpot_ms))
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    summary = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(total_output),
        "total_token_throughput": per_s(total_input + total_output),
        # With no SLO given every completed request is "good", so goodput equals request throughput.
        "request_goodput": per_s(good),
    }
    samples = {
        "ttft": [r.ttft_ms for r in ok],
        "tpot": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "itl": [gap for r in ok for gap in r.itl_ms],
        "e2el": [r.e2el_ms for r in ok],
    }
    for name in LATENCIES:
        summary.update(_stats(name, samples[name]))
    return summary


def _meets_slos(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and r.ttft_ms > slo_ttft_ms:
        return False
    return slo_tpot_ms is None or r.tpot_ms is None or r.tpot_ms <= slo_tpot_ms


def _stats(name: str, values: list[float]) -> dict:
    if not values:
        return {f"{stat}_{name}_ms": None for stat in STATS}
    a = np.asarray(values, dtype=np.float64)
    p90, p99 = np.percentile(a, [90, 99])
    return {
        f"mean_{name}_ms": float(a.mean()),
        f"median_{name}_ms": float(np.median(a)),
        f"std_{name}_ms": float(a.std()),
        f"p90_{name}_ms": float(p90),
        f"p99_{name}_ms": float(p99),
    }


def client_timeseries(records: list[RequestRecord], duration_s: float) -> dict:
    """Requests in flight and completed-token/request throughput over time, from the records alone.

    A chunk's tokens are taken as the request's output tokens spread evenly over its chunks (servers
    may pack several tokens into one chunk).
    """
    bin_s = max(duration_s / 100, 0.05)
    edges = np.arange(0.0, duration_s + bin_s, bin_s)
    starts = np.array([r.start_s for r in records])
    ends = np.array([r.start_s + (r.e2el_ms or 0.0) / 1e3 for r in records])
    mids = edges[:-1] + bin_s / 2
    in_flight = ((starts[None, :] <= mids[:, None]) & (ends[None, :] > mids[:, None])).sum(axis=1)
    chunk_times, chunk_tokens, done_times = [], [], []
    for r in records:
        if not r.success:
            continue
        times = r.start_s + (r.ttft_ms + np.concatenate(([0.0], np.cumsum(r.itl_ms)))) / 1e3
        chunk_times.append(times)
        chunk_tokens.append(np.full(times.size, r.output_tokens / times.size))
        done_times.append(r.start_s + r.e2el_ms / 1e3)
    tokens, _ = np.histogram(np.concatenate(chunk_times or [[]]), edges, weights=np.concatenate(chunk_tokens or [[]]))
    done, _ = np.histogram(done_times, edges)
    return {
        "bin_s": bin_s,
        "t_s": edges[:-1].round(6).tolist(),
        "in_flight": in_flight.tolist(),
        "output_throughput": (tokens / bin_s).tolist(),
        "request_throughput": (done / bin_s).tolist(),
    }


def worker_balance(busy_s: list[float], tokens: list[float]) -> dict:
    """Per-worker busy seconds and processed tokens, and their spread: max/mean (1 is perfect balance)
    and the coefficient of variation."""
    out = {"worker_busy_s": [round(b, 6) for b in busy_s], "worker_tokens": [int(t) for t in tokens]}
    for name, values in (("busy", busy_s), ("tokens", tokens)):
        a = np.asarray(values, dtype=np.float64)
        mean = a.mean()
        out[f"imbalance_{name}_max_over_mean"] = float(a.max() / mean) if mean else 1.0
        out[f"imbalance_{name}_cv"] = float(a.std() / mean) if mean else 0.0
    return out


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; the normal's beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t, sample standard deviation)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()), math.nan
    t = T975[a.size - 2] if a.size - 1 <= len(T975) else 1.960
    return float(a.mean()), float(t * a.std(ddof=1) / math.sqrt(a.size))


def aggregate(summaries: list[dict]) -> tuple[dict, dict]:
    """(mean, 95% half-width) of every number under the same keys, nested dicts included; a True/False
    figure becomes the fraction of runs where it held; lists are dropped. A figure missing (None) in
    some runs is averaged over the runs that have it."""
    mean, ci = {}, {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, dict) for v in present):
            keys = {k for v in present for k in v}
            mean[key], ci[key] = aggregate([{k: v.get(k) for k in keys} for v in present])
        elif present and all(isinstance(v, (int, float)) for v in present):
            mean[key], ci[key] = mean_ci95([float(v) for v in present])
        elif not present:
            mean[key] = ci[key] = None
    return mean, ci
