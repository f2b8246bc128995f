from functools import partial

import numpy as np
import pytest

# Records keep times in ms rounded to µs.
approx = partial(pytest.approx, abs=1e-3)

from loadgen.metrics import RequestRecord, benchmark_duration, client_timeseries, summarize, worker_balance
from loadgen.scrape import GAUGES, PREEMPTIONS, counter_deltas, parse_prometheus, per_worker, pick


def records() -> list[RequestRecord]:
    # start 0: first chunk at 0.1 s, then gaps of 20 and 40 ms, stream ends at 0.17 s; 4 output tokens.
    a = RequestRecord.from_times(0.0, [0.1, 0.12, 0.16], 0.17, input_tokens=10, output_tokens=4)
    # start 0.5: chunks 0.8, 0.81; ends 0.82; 2 tokens.
    b = RequestRecord.from_times(0.5, [0.8, 0.81], 0.82, input_tokens=20)
    # one output token: no TPOT, no ITL.
    c = RequestRecord.from_times(1.0, [1.05], 1.06, input_tokens=30)
    failed = RequestRecord(input_tokens=40, error="HTTP 500: boom", start_s=1.2, e2el_ms=5.0)
    return [a, b, c, failed]


def test_record_from_times():
    a = records()[0]
    assert a.ttft_ms == pytest.approx(100.0)
    assert a.e2el_ms == pytest.approx(170.0)
    assert a.itl_ms == pytest.approx([20.0, 40.0])
    assert a.tpot_ms == approx((170.0 - 100.0) / 3)  # (E2E − TTFT)/(tokens − 1), not mean ITL
    assert records()[2].tpot_ms is None


def test_summary_counts_and_throughputs():
    s = summarize(records(), duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 7)  # failures count for neither
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(33.5)
    assert s["duration"] == 2.0


def test_latency_statistics():
    s = summarize(records(), duration_s=2.0)
    ttfts = [100.0, 300.0, 50.0]
    assert s["mean_ttft_ms"] == pytest.approx(np.mean(ttfts))
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["std_ttft_ms"] == pytest.approx(np.std(ttfts))
    # linear interpolation between order statistics 50, 100, 300 (numpy's default, as vllm uses)
    assert s["p90_ttft_ms"] == pytest.approx(260.0)
    assert s["p99_ttft_ms"] == pytest.approx(296.0)
    # TPOT only from requests with > 1 token: (70/3) and (20/1).
    assert s["mean_tpot_ms"] == approx((70 / 3 + 20) / 2)
    # ITL pooled over all gaps of all requests, not averaged per request.
    assert s["mean_itl_ms"] == pytest.approx(np.mean([20, 40, 10]))
    assert s["p99_itl_ms"] == pytest.approx(39.6)
    assert s["median_e2el_ms"] == pytest.approx(170.0)
    for stat in ("mean", "median", "std", "p90", "p99"):
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert f"{stat}_{name}_ms" in s


def test_goodput_counts_requests_meeting_every_slo():
    rs = records()
    assert summarize(rs, 2.0)["request_goodput"] == pytest.approx(1.5)  # no SLO: every completed one
    assert summarize(rs, 2.0, slo_ttft_ms=150)["request_goodput"] == pytest.approx(1.0)  # a and c
    # a's TPOT 23.3 > 21; b's 20 ok but its TTFT 300 fails; c has no TPOT and passes.
    assert summarize(rs, 2.0, slo_ttft_ms=400, slo_tpot_ms=21)["request_goodput"] == pytest.approx(1.0)
    assert summarize(rs, 2.0, slo_ttft_ms=400, slo_tpot_ms=25)["request_goodput"] == pytest.approx(1.5)


def test_no_successes_gives_empty_statistics():
    s = summarize([records()[3]], 1.0)
    assert s["completed"] == 0 and s["failed"] == 1 and s["mean_ttft_ms"] is None


def test_duration_is_first_send_to_last_completion():
    assert benchmark_duration(records()) == pytest.approx(1.205)


def test_client_timeseries():
    rs = records()[:3]
    ts = client_timeseries(rs, 1.06)
    t = np.array(ts["t_s"])
    assert len(ts["in_flight"]) == len(t) == len(ts["output_throughput"])
    # total tokens and requests are conserved by the binning
    assert sum(ts["output_throughput"]) * ts["bin_s"] == pytest.approx(7)
    assert sum(ts["request_throughput"]) * ts["bin_s"] == pytest.approx(3)
    assert max(ts["in_flight"]) == 1 and ts["in_flight"][0] == 1


METRICS_TEXT = """\
# HELP halffull:num_requests_running Requests in the batch.
# TYPE halffull:num_requests_running gauge
halffull:num_requests_running{worker="0"} 3
halffull:num_requests_running{worker="1"} 4.0
halffull:num_requests_waiting{worker="0"} 1
halffull:num_requests_waiting{worker="1"} 0
halffull:kv_cache_usage_perc{worker="0"} 0.5
halffull:kv_cache_usage_perc{worker="1",note="a \\"quoted} brace\\""} 0.25
halffull:num_preemptions_total{worker="0"} 7 1700000000000
http_requests_total{path="/v1/completions"} NaN
"""

VLLM_TEXT = """\
vllm:num_requests_running{engine="0",model_name="m"} 2
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.75
vllm:num_preemptions_total{engine="0",model_name="m"} 1
"""


def test_prometheus_parsing_and_aggregation():
    m = parse_prometheus(METRICS_TEXT)
    assert list(m["halffull:num_requests_running"].values()) == [3.0, 4.0]
    assert per_worker(m, "halffull:kv_cache_usage_perc") == {"0": 0.5, "1": 0.25}
    assert pick(m, *GAUGES["num_requests_running"]) == 7  # summed across workers
    assert pick(m, *GAUGES["num_requests_waiting"]) == 1
    assert pick(m, *GAUGES["kv_cache_usage_perc"]) == pytest.approx(0.375)  # averaged
    assert pick(m, (PREEMPTIONS,), sum) == 7


def test_vllm_names_are_accepted():
    m = parse_prometheus(VLLM_TEXT)
    assert pick(m, *GAUGES["num_requests_running"]) == 2
    assert pick(m, *GAUGES["kv_cache_usage_perc"]) == 0.75
    assert pick(m, *GAUGES["num_requests_waiting"]) is None


def test_worker_counters_over_a_run():
    before = parse_prometheus('halffull:worker_busy_seconds_total{model_name="m",worker="0"} 2.5\n'
                              'halffull:worker_busy_seconds_total{model_name="m",worker="1"} 9.0\n')
    after = parse_prometheus('halffull:worker_busy_seconds_total{model_name="m",worker="0"} 4.0\n'
                             'halffull:worker_busy_seconds_total{model_name="m",worker="1"} 1.5\n'
                             'halffull:worker_busy_seconds_total{model_name="m",worker="2"} 0.5\n')
    name = "halffull:worker_busy_seconds_total"
    # worker 1 was restarted (its counter went down): all of its new count is from the run;
    # worker 2 joined during the run
    assert counter_deltas(per_worker(before, name), per_worker(after, name)) == {"0": 1.5, "1": 1.5, "2": 0.5}


def test_worker_balance_figures():
    b = worker_balance([1.0, 1.0, 4.0], [100, 300, 200])
    assert b["worker_busy_s"] == [1.0, 1.0, 4.0] and b["worker_tokens"] == [100, 300, 200]
    assert b["imbalance_busy_max_over_mean"] == pytest.approx(2.0)
    assert b["imbalance_busy_cv"] == pytest.approx(np.std([1, 1, 4]) / 2)
    assert b["imbalance_tokens_max_over_mean"] == pytest.approx(1.5)
    even = worker_balance([3.0, 3.0], [7, 7])
    assert even["imbalance_busy_max_over_mean"] == 1.0 and even["imbalance_tokens_cv"] == 0.0

