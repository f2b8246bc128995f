import json
from pathlib import Path

import pytest

from loadgen import compare
from loadgen.__main__ import main as loadgen_main
from loadgen.metrics import RequestRecord, benchmark_duration, client_timeseries, summarize
from loadgen.report import LATENCY_PLOT, TIMELINE_PLOT, load_results, plot_run, print_summary, write_results
from loadgen.sweep import plot_sweep, rate_label

REQUIRED_REQUEST_KEYS = {"input_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms", "itl_ms", "success",
                         "error", "start_s"}
REQUIRED_SUMMARY_KEYS = {
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "request_goodput",
} | {f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p90", "p99")
     for name in ("ttft", "tpot", "itl", "e2el")}


def make_run(out: Path, speed: float, with_server: bool = True) -> dict:
    """A small run written the way the live benchmark (or the simulator) writes one."""
    records = [
        RequestRecord.from_times(i * 0.1, [i * 0.1 + speed * (0.05 + 0.01 * k) for k in range(8)],
                                 i * 0.1 + speed * 0.13, input_tokens=32, requested_output_tokens=8)
        for i in range(20)
    ]
    records.append(RequestRecord(input_tokens=32, error="HTTP 503: overloaded", start_s=0.3, e2el_ms=1.0))
    duration = benchmark_duration(records)
    summary = summarize(records, duration, slo_ttft_ms=60)
    server = {"available": with_server, "t_s": [0.0, 0.5, 1.0, 1.5], "num_requests_running": [0, 3, 2, None],
              "num_requests_waiting": [0, 1, 0, None], "kv_cache_usage_perc": [0.0, 0.4, 0.2, None],
              "num_preemptions": 2.0}
    config = {"rate": float("inf"), "workload": "synthetic", "output": out}
    path = write_results(out, summary, records, config, client_timeseries(records, duration), server)
    assert path == out / "results.json"
    return load_results(out)


def test_results_json_has_the_required_shape(tmp_path):
    results = make_run(tmp_path, 1.0)
    raw = json.loads((tmp_path / "results.json").read_text())  # plain JSON, no NaN/Infinity tokens
    assert set(raw) == {"summary", "requests", "config", "timeseries", "server"}
    assert REQUIRED_SUMMARY_KEYS <= set(raw["summary"])
    assert len(raw["requests"]) == 21 and all(REQUIRED_REQUEST_KEYS <= set(r) for r in raw["requests"])
    assert raw["config"]["rate"] == "inf" and raw["config"]["output"] == str(tmp_path)
    assert raw["summary"]["completed"] == 20 and raw["summary"]["failed"] == 1
    assert raw["requests"][-1]["error"] == "HTTP 503: overloaded"
    assert results == raw


@pytest.mark.parametrize("with_server", [True, False])
def test_plots_are_written(tmp_path, with_server):
    results = make_run(tmp_path, 1.0, with_server)
    paths = plot_run(tmp_path, results)
    assert {p.name for p in paths} == {LATENCY_PLOT, TIMELINE_PLOT}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_summary_table(capsys, tmp_path):
    print_summary(make_run(tmp_path, 1.0)["summary"])
    out = capsys.readouterr().out
    assert "Request goodput" in out and "P99 TTFT" in out


def test_compare_prints_a_side_by_side_table_and_plots(tmp_path, capsys):
    make_run(tmp_path / "fcfs", 1.0)
    make_run(tmp_path / "slai", 2.0)
    assert loadgen_main(["compare", str(tmp_path / "fcfs"), str(tmp_path / "slai"), "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fcfs" in out and "slai" in out and "Median TTFT" in out
    row = next(line for line in out.splitlines() if "Median TTFT" in line)
    assert "50.00" in row and "100.00" in row  # 1× and 2× slower runs, side by side
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_names_runs_by_path_when_folder_names_collide():
    assert compare.run_names(["a/run", "b/run"]) == ["a/run", "b/run"]
    assert compare.run_names(["x/fcfs", "x/sal"]) == ["fcfs", "sal"]


def test_sweep_plot(tmp_path):
    runs = [{"rate": rate_label(r), "summary": make_run(tmp_path / rate_label(r), 1.0 + i)["summary"]}
            for i, r in enumerate((1.0, 2.5, float("inf")))]
    assert [r["rate"] for r in runs] == ["1", "2.5", "inf"]
    assert plot_sweep(tmp_path / "sweep.png", runs).stat().st_size > 10_000

