import argparse
import json
import math

import numpy as np
import pytest

from loadgen.args import add_workload_args
from loadgen.workload import (
    WorkloadRequest, arrival_times, build_schedule, clamp_to_context, load_workload, read_trace,
    synthetic_workload,
)
from server_utils import CONV_TRACE, SHAREGPT_TRACE

needs_trace = pytest.mark.usefixtures("conv_trace")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return parser.parse_args(list(argv))


def gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray(times))


def test_poisson_gaps_have_mean_one_over_rate_and_cv_one():
    g = gaps(arrival_times(4000, rate=8.0, burstiness=1.0, seed=3))
    assert g.mean() == pytest.approx(1 / 8.0, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness):
    g = gaps(arrival_times(5000, rate=20.0, burstiness=burstiness, seed=1))
    assert g.mean() == pytest.approx(1 / 20.0, rel=0.06)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrivals_are_seeded_and_start_at_zero():
    a = arrival_times(100, rate=5.0, seed=7)
    assert a == arrival_times(100, rate=5.0, seed=7)
    assert a != arrival_times(100, rate=5.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5) == [0.0] * 5


def test_duration_limits_and_sizes_the_arrivals():
    by_duration = arrival_times(None, rate=50.0, seed=2, duration_s=10.0)
    assert max(by_duration) < 10.0
    assert len(by_duration) == pytest.approx(500, rel=0.15)
    # A count-limited call walks the same stream.
    assert arrival_times(len(by_duration), rate=50.0, seed=2) == by_duration


def test_synthetic_count_follows_duration():
    requests = load_workload(parse("--workload", "synthetic", "--rate", "20", "--duration", "5"))
    assert len(requests) == len(arrival_times(None, rate=20.0, seed=0, duration_s=5.0))


def test_synthetic_length_distributions():
    fixed = synthetic_workload(50, 512, 128, "fixed")
    assert {(r.input_tokens, r.output_tokens) for r in fixed} == {(512, 128)}
    uniform = synthetic_workload(2000, 100, 10, "uniform", range_ratio=0.5, seed=1)
    inputs = [r.input_tokens for r in uniform]
    assert min(inputs) >= 50 and max(inputs) <= 150 and np.mean(inputs) == pytest.approx(100, rel=0.03)
    lognormal = synthetic_workload(4000, 300, 50, "lognormal", lognormal_sigma=0.8, seed=1)
    inputs = np.array([r.input_tokens for r in lognormal])
    assert inputs.min() >= 1 and inputs.mean() == pytest.approx(300, rel=0.06)
    assert np.median(inputs) < inputs.mean()  # right-skewed, unlike the others


@needs_trace
def test_reads_the_azure_trace():
    requests = read_trace(CONV_TRACE)
    assert len(requests) == 19366
    first, second = requests[0], requests[1]
    assert (first.input_tokens, first.output_tokens, first.arrival_s) == (374, 44, 0.0)
    # 2023-11-16 18:15:46.6805900 -> 18:15:50.9951690
    assert second.arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (second.input_tokens, second.output_tokens) == (396, 109)
    assert all(r.arrival_s <= s.arrival_s for r, s in zip(requests, requests[1:]))


@needs_trace
def test_replayed_trace_times_are_scaled():
    schedule = build_schedule(parse("--workload", str(CONV_TRACE), "--replay-timestamps", "--time-scale", "0.5",
                                    "--num-requests", "100"))
    assert len(schedule) == 100
    assert schedule[0].arrival_s == 0.0
    assert schedule[1].arrival_s == pytest.approx(4.314579 * 0.5, abs=1e-6)
    unscaled = read_trace(CONV_TRACE)[:100]
    assert [s.arrival_s for s in schedule] == pytest.approx([0.5 * r.arrival_s for r in unscaled])


@needs_trace
def test_trace_at_a_rate_keeps_row_order_of_the_seeds_window_and_draws_poisson_arrivals():
    schedule = build_schedule(parse("--workload", str(CONV_TRACE), "--rate", "4", "--num-requests", "3000",
                                    "--seed", "5"))
    rows = read_trace(CONV_TRACE)[15000:18000]  # seed 5: the sixth window of 3000
    assert [(s.input_tokens, s.output_tokens) for s in schedule] == [(r.input_tokens, r.output_tokens) for r in rows]
    assert gaps([s.arrival_s for s in schedule]).mean() == pytest.approx(0.25, rel=0.06)


def test_replay_needs_timestamps():
    with pytest.raises(ValueError, match="replay"):
        build_schedule(parse("--workload", "synthetic", "--replay-timestamps", "--num-requests", "3"))


def test_jsonl_workload(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello there", "output_tokens": 7}, {"prompt": "x", "max_tokens": 3}, {"prompt": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    requests = load_workload(parse("--workload", str(path), "--output-len", "11"))
    assert [(r.prompt, r.output_tokens) for r in requests] == [("hello there", 7), ("x", 3), ("y", 11)]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=":1:"):
        load_workload(parse("--workload", str(path)))


def test_clamp_to_context_keeps_outputs_and_shortens_prompts():
    requests = [WorkloadRequest(100, 50), WorkloadRequest(900, 200), WorkloadRequest(10, 5000),
                WorkloadRequest(900, 300, prompt="text")]
    clamped, changed = clamp_to_context(requests, 1000)
    assert changed == 3
    assert [(r.input_tokens, r.output_tokens) for r in clamped] == [(100, 50), (800, 200), (1, 999), (900, 100)]


def test_unknown_workload_kind_is_rejected():
    with pytest.raises(ValueError, match="--workload"):
        load_workload(parse("--workload", "trace.txt"))


@needs_trace
def test_length_only_trace_draws_rows_per_seed_and_cuts_poisson_gaps_at_three_means():
    argv = ("--workload", str(SHAREGPT_TRACE), "--rate", "2", "--num-requests", "4000")
    a, b = build_schedule(parse(*argv, "--seed", "1")), build_schedule(parse(*argv, "--seed", "2"))
    rows = {(r.input_tokens, r.output_tokens) for r in read_trace(SHAREGPT_TRACE)}
    assert {(r.input_tokens, r.output_tokens) for r in a} <= rows
    assert [r.input_tokens for r in a] != [r.input_tokens for r in b]
    g = gaps([r.arrival_s for r in a])
    assert g.max() == pytest.approx(1.5)  # 3 x the mean gap of 0.5 s, reached by ~5% of exponential gaps
    assert np.isclose(g, 1.5, rtol=1e-9).mean() == pytest.approx(np.exp(-3), abs=0.015)
    uncut = gaps([r.arrival_s for r in build_schedule(parse(*argv, "--seed", "1", "--max-gap-factor", "1000"))])
    assert uncut.max() > 2.5
