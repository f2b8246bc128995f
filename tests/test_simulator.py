"""The simulator: real policies on the step-time model, in virtual time."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from loadgen.metrics import mean_ci95
from loadgen.report import load_results
from loadgen.simulate import SimulationError, build_parser, main, simulate
from loadgen.step_model import PRESETS, SLAI_PLOT1_BATCH_MS, StepModel, fit
from loadgen.sweep import capacity_of
from scheduling import SCHEDULERS, StepPlan
from scheduling.policies.fcfs import FCFS
from server_utils import CONV_TRACE

pytestmark = pytest.mark.usefixtures("conv_trace")


def run(tmp_path: Path, *argv: str, name: str = "run") -> dict:
    args = build_parser().parse_args(["--workload", str(CONV_TRACE), "--output", str(tmp_path / name), *argv])
    return simulate(args, Console(file=io.StringIO()))


def assert_exact(results: dict, n: int) -> None:
    s = results["summary"]
    assert (s["completed"], s["failed"]) == (n, 0)
    rows = results["requests"]
    assert len(rows) == n
    assert all(r["output_tokens"] == r["requested_output_tokens"] and len(r["itl_ms"]) == r["output_tokens"] - 1
               for r in rows)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_completes_every_request_with_exact_lengths(tmp_path, scheduler):
    # A small KV pool makes memory the constraint, so preemption and recompute are exercised.
    results = run(tmp_path, "--scheduler", scheduler, "--num-requests", "120", "--rate", "30", "--kv-tokens", "24000")
    assert_exact(results, 120)
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "timeline.png").exists()
    if scheduler == "fcfs":
        assert results["summary"]["num_preemptions"] > 0
        assert sum(r["num_preemptions"] for r in results["requests"]) == results["summary"]["num_preemptions"]


def test_same_seed_same_results_other_seed_other_results(tmp_path):
    argv = ("--scheduler", "larry", "--balancer", "power-of-two", "--workers", "3", "--num-requests", "150",
            "--rate", "40", "--kv-tokens", "40000")
    a, b = run(tmp_path, *argv, name="a"), run(tmp_path, *argv, name="b")
    c = run(tmp_path, *argv, "--seed", "1", name="c")
    for r in (a, b, c):
        del r["summary"]["simulation_wall_s"]
    assert a["summary"] == b["summary"] and a["requests"] == b["requests"]
    assert load_results(tmp_path / "a")["requests"] == load_results(tmp_path / "b")["requests"]
    assert a["requests"] != c["requests"]


def test_four_workers_with_sal_use_every_worker(tmp_path):
    """The per-worker load figures agree with where each request ran. Shown to fail with `worker_balance`
    (loadgen/metrics.py) dividing the maximum by the minimum instead of the mean, and with it listing the
    workers' token counts in reverse order."""
    results = run(tmp_path, "--balancer", "sal", "--workers", "4", "--num-requests", "200", "--rate", "60")
    assert_exact(results, 200)
    s = results["summary"]
    assert {r["worker"] for r in results["requests"]} == {0, 1, 2, 3}
    assert s["worker_requests"] == [sum(r["worker"] == w for r in results["requests"]) for w in range(4)]
    assert min(s["worker_requests"]) > 0 and s["num_preemptions"] == 0
    # Without preemption a worker processes each of its prompts once and feeds back every output token but
    # the last.
    tokens = np.zeros(4)
    for r in results["requests"]:
        tokens[r["worker"]] += r["input_tokens"] + r["output_tokens"] - 1
    assert s["worker_tokens"] == tokens.tolist()
    for name, values in (("tokens", tokens), ("busy", np.array(s["worker_busy_s"]))):
        assert min(values) > 0
        assert s[f"imbalance_{name}_max_over_mean"] == pytest.approx(values.max() / values.mean())
        assert s[f"imbalance_{name}_cv"] == pytest.approx(values.std() / values.mean())


def test_ten_thousand_requests_on_one_worker(tmp_path):
    # How fast this runs is measured in BENCHMARKS.md ("Simulator speed"), not asserted here.
    results = run(tmp_path, "--num-requests", "10000", "--rate", "18")
    assert_exact(results, 10000)


def test_fit_recovers_known_coefficients(tmp_path):
    true = StepModel(6e-3, 2e-5, 3e-6, 4e-8)
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(500):
        seqs = int(rng.integers(1, 256))
        tokens = seqs + int(rng.integers(0, 2048))
        kv = int(seqs * rng.integers(16, 4096))
        seconds = true.c0 + true.c1 * tokens + true.c2 * seqs + true.c3 * kv
        lines.append(json.dumps({"batched_tokens": tokens, "num_seqs": seqs, "kv_tokens_read": kv,
                                 "seconds": seconds * (1 + rng.normal(0, 1e-4))}))
    log = tmp_path / "steps.jsonl"
    log.write_text("\n".join(lines) + "\n")
    model, quality = fit(log)
    for name in ("c0", "c1", "c2", "c3"):
        assert getattr(model, name) == pytest.approx(getattr(true, name), rel=0.02), name
    assert quality["steps"] == 500
    # The command writes what --step-model reads.
    assert main(["fit", str(log), "--output", str(tmp_path / "model.json")]) == 0
    assert StepModel.load(tmp_path / "model.json") == model


def test_a_stalled_scheduler_is_an_error_not_a_hang(tmp_path, monkeypatch):
    class Stuck(FCFS):
        def schedule(self, now):
            return StepPlan()

    monkeypatch.setitem(SCHEDULERS, "stuck", Stuck)
    with pytest.raises(SimulationError, match="never finished"):
        run(tmp_path, "--scheduler", "stuck", "--num-requests", "5")


# ---- issue 14: presets, output-length modes, time limit, seeds, capacity -------------------------------
def test_rtx6000ada_preset_reproduces_the_slai_authors_batch_times():
    model, kv_tokens, _ = PRESETS["rtx6000ada-mistral7b"]
    assert model.c3 == pytest.approx(131072 / 960e9) and model.c2 == 0.0
    for chunk, ms in SLAI_PLOT1_BATCH_MS:  # each batch: one chunk of a 2048-token prompt
        sizes = [chunk] * (2048 // chunk) + ([2048 % chunk] if 2048 % chunk else [])
        ends = np.cumsum(sizes)
        predicted = np.mean([model.c0 + model.c1 * n + model.c3 * end for n, end in zip(sizes, ends)])
        assert predicted * 1e3 == pytest.approx(ms, abs=3.5), chunk
    assert kv_tokens == 236_000


def test_output_length_mode_decides_what_policies_know(tmp_path):
    # ILS reserves prompt + max_tokens: told the true lengths it packs more requests than when
    # max_tokens is only the workload's limit. Outputs end at the trace's lengths either way.
    argv = ("--scheduler", "ils", "--num-requests", "150", "--rate", "40", "--kv-tokens", "40000")
    oracle = run(tmp_path, *argv, "--output-length", "oracle", name="oracle")
    limit = run(tmp_path, *argv, "--output-length", "max-tokens", name="limit")
    for r in (oracle, limit):
        assert_exact(r, 150)
    assert (oracle["config"]["output_length"], limit["config"]["output_length"]) == ("oracle", "max-tokens")
    assert limit["config"]["max_tokens"] == max(r["output_tokens"] for r in limit["requests"])
    assert limit["summary"]["mean_queue_ms"] > 1.2 * oracle["summary"]["mean_queue_ms"]


def test_time_limit_reports_censored_and_uncensored(tmp_path):
    results = run(tmp_path, "--num-requests", "300", "--rate", "30", "--kv-tokens", "30000", "--time-limit", "8")
    censored, full = results["summary"], results["summary_uncensored"]
    assert full["completed"] == 300 and 0 < censored["completed"] < 300
    assert censored["censored_requests"] == 300 - censored["completed"]
    ends = sorted(r["start_s"] + r["e2el_ms"] / 1e3 for r in results["requests"])
    assert censored["completed"] == sum(e <= 8 for e in ends)
    # The censored run misses the slowest requests, so its tail is lighter.
    assert censored["p99_e2el_ms"] < full["p99_e2el_ms"]
    assert set(censored["ttft_by_prompt"]) <= set(full["ttft_by_prompt"])


def test_seeds_report_the_mean_and_a_student_t_interval(tmp_path):
    results = run(tmp_path, "--num-requests", "60", "--rate", "20", "--seeds", "3", "--seed", "4", "--summary-only")
    per_seed = results["seed_summaries"]
    assert [load_results(tmp_path / "run" / f"seed_{s}")["config"]["seed"] for s in (4, 5, 6)] == [4, 5, 6]
    ttft = [s["mean_ttft_ms"] for s in per_seed]
    assert results["summary"]["mean_ttft_ms"] == pytest.approx(np.mean(ttft))
    assert results["summary_ci95"]["mean_ttft_ms"] == pytest.approx(4.303 * np.std(ttft, ddof=1) / np.sqrt(3))
    on_disk = load_results(tmp_path / "run")
    assert on_disk["summary_ci95"] == results["summary_ci95"] and on_disk["config"]["seeds"] == 3


def test_the_95_interval_covers_a_known_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for k in (2, 5, 12):
        trials = rng.normal(10.0, 3.0, size=(4000, k))
        covered = 0
        for sample in trials:
            mean, half = mean_ci95(sample.tolist())
            covered += abs(mean - 10.0) <= half
        assert covered / len(trials) == pytest.approx(0.95, abs=0.012), k
    assert mean_ci95([1, 2, 3, 4, 5]) == pytest.approx((3.0, 2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5)))


def test_capacity_is_the_highest_load_meeting_the_slo():
    met = {"100": {"met": True}}
    runs = [{"median_ttft_ms": 100, "tbt_tiers": met}, {"median_ttft_ms": 400, "tbt_tiers": met},
            {"median_ttft_ms": 700, "tbt_tiers": met}]
    assert capacity_of([1, 2, 3], runs, "median_ttft_ms", 500, tbt=True) == (pytest.approx(2 + 100 / 300), False)
    runs[2] = {"median_ttft_ms": 300, "tbt_tiers": {"100": {"met": False}}}
    assert capacity_of([1, 2, 3], runs, "median_ttft_ms", 500, tbt=True) == (2, False)  # TBT missed at 3
    assert capacity_of([1, 2, 3], runs, "median_ttft_ms", 500, tbt=False) == (3, True)  # met everywhere: >= 3
