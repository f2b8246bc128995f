"""The load generator against the real server (`python -m server`, demo model), both as subprocesses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadgen.scrape import parse_prometheus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "server" / "__main__.py").exists(), reason="server not written yet")
READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        assert len(r["itl_ms"]) >= 1
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
    exported = parse_prometheus(httpx.get(server.removesuffix("/v1") + "/metrics").text)
    if "halffull:num_requests_running" in exported:  # once the server exports samples of its gauges
        assert server_side["available"]
        assert any(v is not None for v in server_side["num_requests_running"])


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
