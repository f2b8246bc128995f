"""The simulator: real policies on the step-time model, in virtual time."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from loadgen.report import load_results
from loadgen.simulate import SimulationError, build_parser, main, simulate
from loadgen.step_model import StepModel, fit
from scheduling import SCHEDULERS, StepPlan
from scheduling.policies.fcfs import FCFS
from server_utils import CONV_TRACE

pytestmark = pytest.mark.skipif(not CONV_TRACE.exists(), reason="Azure conv trace not present")


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
    results = run(tmp_path, "--balancer", "sal", "--workers", "4", "--num-requests", "200", "--rate", "60")
    assert_exact(results, 200)
    s = results["summary"]
    assert {r["worker"] for r in results["requests"]} == {0, 1, 2, 3}
    assert sum(s["worker_requests"]) == 200 and min(s["worker_requests"]) > 0
    assert s["imbalance_tokens_max_over_mean"] >= 1.0 and s["imbalance_busy_cv"] >= 0.0


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
