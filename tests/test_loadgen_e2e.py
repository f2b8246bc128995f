"""The load generator against the real server (`python -m server`, demo model), both as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_utils import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_process():
    # Two workers behind SAL, the token-aware balancer: the runs below must reach both.
    server = ServerProcess("--workers", "2", "--balancer", "sal")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.url + "/v1"


def run_loadgen(base_url: str, out: Path, *options: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "loadgen", "--base-url", base_url, "--output", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Benchmark result" in result.stdout
    return json.loads((out / "results.json").read_text())


def check_run(results: dict, out: Path, count: int) -> None:
    requests = results["requests"]
    assert len(requests) == count
    assert all(r["success"] for r in requests), [r["error"] for r in requests if not r["success"]]
    for r in requests:
        # ignore_eos forces the requested length, and the client's count is the server's usage
        assert r["output_tokens"] == r["requested_output_tokens"] == r["usage_output_tokens"]
        assert 0 < r["ttft_ms"] <= r["e2el_ms"]
        # one gap per content chunk after the first; the demo model's random bytes can leave several
        # tokens in one chunk (text is held back while it ends in an incomplete UTF-8 character)
        assert len(r["itl_ms"]) <= r["output_tokens"] - 1
        assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2el_ms"] + 1e-3 * (len(r["itl_ms"]) + 1)
    assert sum(len(r["itl_ms"]) for r in requests) >= count  # streamed, not one chunk per request
    summary = results["summary"]
    assert summary["completed"] == count and summary["failed"] == 0
    assert summary["total_output_tokens"] == sum(r["requested_output_tokens"] for r in requests)
    for name in ("latency_cdf.png", "timeline.png"):
        assert (out / name).stat().st_size > 10_000


def test_completions_with_exact_token_lengths(server, tmp_path):
    results = run_loadgen(server, tmp_path, "--workload", "synthetic", "--input-len", "32", "--output-len", "16",
                          "--num-requests", "16", "--rate", "inf")
    check_run(results, tmp_path, 16)
    # token-id prompts: the server counts exactly the requested prompt length
    assert results["config"]["prompt_kind"] == "token_ids"
    assert all(r["input_tokens"] == 32 for r in results["requests"])
    server_side = results["server"]
    assert len(server_side["t_s"]) == len(server_side["num_requests_running"]) >= 2  # before and after
    assert server_side["available"]
    assert any(v is not None for v in server_side["num_requests_running"])


def test_sal_balancer_uses_both_workers(server, tmp_path):
    results = run_loadgen(server, tmp_path, "--workload", "synthetic", "--input-len", "64", "--output-len", "32",
                          "--length-dist", "uniform", "--num-requests", "24", "--rate", "inf")
    text = httpx.get(server.removesuffix("/v1") + "/metrics").text
    received = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("halffull:worker_requests_total{")]
    assert len(received) == 2 and min(received) >= 4, received
    # the report's load-imbalance figures, from the workers' busy-time and token counters
    s = results["summary"]
    assert len(s["worker_busy_s"]) == 2 and min(s["worker_busy_s"]) > 0
    assert min(s["worker_tokens"]) > 0
    # every output token but each request's last is fed back through a model pass (prompt tokens may
    # come from the prefix cache instead)
    assert sum(s["worker_tokens"]) >= s["total_output_tokens"] - 24
    assert 1.0 <= s["imbalance_busy_max_over_mean"] <= 2.0
    assert (tmp_path / "workers.png").stat().st_size > 10_000


def test_chat_with_varied_lengths_and_arrivals(server, tmp_path):
    results = run_loadgen(server, tmp_path, "--endpoint", "chat", "--workload", "synthetic", "--input-len", "24",
                          "--output-len", "12", "--length-dist", "uniform", "--num-requests", "8", "--rate", "20",
                          "--max-concurrency", "4", "--slo-ttft-ms", "60000")
    check_run(results, tmp_path, 8)
    assert len({r["requested_output_tokens"] for r in results["requests"]}) > 1
    assert results["summary"]["request_goodput"] == pytest.approx(results["summary"]["request_throughput"])


def test_sweep_runs_one_benchmark_per_rate(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loadgen", "sweep", "--rates", "20,inf", "--base-url", server, "--workload", "synthetic",
         "--input-len", "16", "--output-len", "8", "--num-requests", "6", "--output", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["rate"] for run in sweep["runs"]] == ["20", "inf"]
    for run in sweep["runs"]:
        assert run["summary"]["completed"] == 6
        assert (tmp_path / f"rate_{run['rate']}" / "results.json").exists()
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
