"""Command-line options, grouped so that the live run, the sweep and the simulator share them."""

from __future__ import annotations

import argparse
import math


def positive_float(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Workload, arrival and SLO options: everything that defines the offered load and its targets."""
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", required=True,
                   help="PATH.csv (Azure 2023 trace: TIMESTAMP, ContextTokens, GeneratedTokens; or lengths "
                        "only: num_prefill_tokens, num_decode_tokens, drawn per --seed, arrivals at --rate), "
                        "PATH.jsonl (one {\"prompt\", \"output_tokens\"} per line) or 'synthetic'")
    w.add_argument("--input-len", type=positive_int, default=512, help="synthetic: mean prompt tokens")
    w.add_argument("--output-len", type=positive_int, default=128,
                   help="synthetic: mean output tokens; JSONL: for rows that give none")
    w.add_argument("--length-dist", choices=("fixed", "uniform", "lognormal"), default="fixed",
                   help="synthetic length distribution")
    w.add_argument("--range-ratio", type=float, default=0.5,
                   help="uniform: lengths in len·[1−r, 1+r]")
    w.add_argument("--lognormal-sigma", type=float, default=0.5, help="lognormal: σ of log length")
    w.add_argument("--tokenizer", metavar="DIR",
                   help="local Hugging Face tokenizer, used when the server has no /tokenize")
    w.add_argument("--max-model-len", type=positive_int,
                   help="context length to clamp prompt + output to (default: what the server reports)")
    w.add_argument("--no-clamp", dest="clamp", action="store_false",
                   help="send over-long requests as they are")

    a = parser.add_argument_group("arrivals")
    a.add_argument("--rate", type=positive_float, default=math.inf,
                   help="requests/s (Poisson, or gamma with --burstiness); 'inf' sends all at once")
    a.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of the inter-arrival gaps: 1 = Poisson, < 1 burstier")
    a.add_argument("--replay-timestamps", action="store_true",
                   help="CSV trace: send at the trace's own times (times --time-scale); overrides --rate")
    a.add_argument("--time-scale", type=positive_float, default=1.0,
                   help="multiplies trace times: 0.5 replays twice as fast")
    a.add_argument("--num-requests", type=positive_int, help="cap on the number of requests")
    a.add_argument("--duration", type=positive_float, help="send only requests arriving before S seconds")
    a.add_argument("--max-concurrency", type=positive_int, help="at most C requests in flight")
    a.add_argument("--max-gap-factor", type=positive_float,
                   help="cut each drawn inter-arrival gap at F × the mean gap (default: 3 for a length-only "
                        "CSV, as the SLAI authors draw arrivals; otherwise no cut)")
    a.add_argument("--seed", type=int, default=0,
                   help="seeds arrivals, lengths and prompts; picks the rows of a length-only CSV and "
                        "the window (seed × --num-requests) of a timestamped one")

    s = parser.add_argument_group("SLOs (goodput counts requests meeting all given)")
    s.add_argument("--slo-ttft-ms", type=positive_float, help="time to first token target")
    s.add_argument("--slo-tpot-ms", type=positive_float, help="time per output token target")


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """Options of a live run against a server."""
    c = parser.add_argument_group("client")
    c.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI API root")
    c.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    c.add_argument("--model", help="model name (default: the first one the server lists)")
    c.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    c.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop early instead of forcing the requested output length")
    c.add_argument("--extra-body", type=_json_object, default={},
                   help="JSON object merged into every request body, e.g. '{\"priority\": 1}'")
    c.add_argument("--warmup", type=int, default=0, help="send N uncounted requests first")
    c.add_argument("--request-timeout", type=positive_float, default=600.0,
                   help="seconds a request may wait for any byte before it counts as failed")
    c.add_argument("--metrics-interval", type=positive_float, default=0.5,
                   help="seconds between scrapes of the server's /metrics")


def add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", help="where results.json and plots go")


def _json_object(text: str) -> dict:
    import json

    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
