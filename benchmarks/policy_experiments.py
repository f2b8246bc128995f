"""The policy experiments of issue 14, all of them, in the simulator, each with >= 5 seeds; then the
tables BENCHMARKS.md quotes.

    python benchmarks/policy_experiments.py [--out out/policy] [--jobs 2] [--seeds 5] [--only slai,scls,larry,sal]
    # or several invocations at once, over disjoint sets of runs (--only GROUPS, --runs NAME-PARTS)
    python benchmarks/policy_experiments.py --tables-only [--out out/policy] > tables.md

Each run is one `python -m loadgen simulate ... --seeds K --output OUT/<name>` (printed before it
starts); a run whose results.json exists is not run again, so an interrupted script resumes. No
run uses the length oracle unless its name ends in `-oracle`. Experiments:
- slai: SLAI vs Sarathi-Serve in the SLAI authors' setup: rtx6000ada-mistral7b preset, ShareGPT
  lengths, Poisson arrivals (gaps cut at 3x the mean), 5% of users at a 100 ms TBT target and 95%
  at 500 ms, runs stopped at 2,100 s (censored; uncensored beside), a load sweep, and the capacity
  at median TTFT < 0.5 s with every TBT target met (loadgen.sweep.capacity).
- scls: SCLS vs ils, static, sls and fcfs at saturation: a memory-scarce, decode-heavy synthetic
  workload (500 requests at once; 32k KV tokens, 128-token prompts, 512-token outputs, max_tokens
  1024), and the Azure conversation trace (1000 requests at once, 150k KV tokens).
- larry: LARRY vs FCFS with ablations (fit check alone, smallest-first alone, no aging bound) and
  one oracle row, on the Azure conversation trace (1000 requests) with 150k KV tokens, at 14, 16
  and 18 req/s.
- sal: SAL vs round-robin, power-of-two and least-loaded, heavy-tailed (lognormal sigma 1.5)
  lengths with bursty (gamma shape 0.25) arrivals at 30 req/s per worker (50 requests per worker;
  25 with 16 workers),
  on the H100 preset: 4, 8 and 16 workers at 10 ms report delay; SAL and round-robin at 1 and
  100 ms delays with 8 workers; and all four with 8 workers, one of them 2x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen.metrics import mean_ci95  # noqa: E402
from loadgen.sweep import capacity  # noqa: E402

SLAI_RATES = (1.2, 1.6, 2.0, 2.4)
SLAI_TIME_LIMIT = 2100.0
LARRY_RATES = (14, 16, 18)
SAL_BALANCERS = ("round-robin", "power-of-two", "least-loaded", "sal")
SAL_RATE_PER_WORKER = 30
SAL_REQUESTS_PER_WORKER = 50


def experiments(traces: Path) -> dict[str, list[tuple[str, list[str]]]]:
    sharegpt, conv = str(traces / "sharegpt_8k_lengths.csv"), str(traces / "azure_llm_2023_conv.csv")
    slai = []
    for rate in SLAI_RATES:
        for policy in ("sarathi", "slai"):
            slai.append((f"slai/{policy}-r{rate:g}", [
                "--scheduler", policy, "--preset", "rtx6000ada-mistral7b", "--workload", sharegpt,
                "--rate", f"{rate:g}", "--num-requests", str(math.ceil(rate * 2000)),
                "--tbt-slo-ms", "500", "--strict-tbt-frac", "0.05", "--strict-tbt-ms", "100",
                "--time-limit", f"{SLAI_TIME_LIMIT:g}", "--slo-ttft-ms", "500"]))
    scls = []
    regimes = {
        "decode-heavy": ["--workload", "synthetic", "--input-len", "128", "--output-len", "512", "--length-dist",
                         "uniform", "--range-ratio", "0.9", "--max-tokens", "1024", "--kv-tokens", "32768",
                         "--num-requests", "500", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "100"],
        "azure-conv": ["--workload", conv, "--kv-tokens", "150000", "--num-requests", "1000",
                       "--slo-ttft-ms", "60000", "--slo-tpot-ms", "100"],
    }
    for regime, argv in regimes.items():
        for policy in ("scls", "ils", "static", "sls", "fcfs"):
            scls.append((f"scls/{regime}-{policy}", ["--scheduler", policy, "--rate", "inf", *argv]))
    larry = []
    variants = {"fcfs": ["--scheduler", "fcfs"], "larry": ["--scheduler", "larry"],
                "larry-fit-check-only": ["--scheduler", "larry", "--no-larry-smallest-first"],
                "larry-smallest-first-only": ["--scheduler", "larry", "--no-larry-fit-check"],
                "larry-no-aging": ["--scheduler", "larry", "--larry-max-wait-s", "0"],
                "larry-oracle": ["--scheduler", "larry", "--output-length", "oracle"]}
    for rate in LARRY_RATES:
        for name, argv in variants.items():
            larry.append((f"larry/r{rate}-{name}", [*argv, "--workload", conv, "--kv-tokens", "150000",
                                                    "--rate", str(rate), "--num-requests", "1000",
                                                    "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100"]))
    sal = []
    heavy = ["--workload", "synthetic", "--input-len", "1024", "--output-len", "256", "--length-dist", "lognormal",
             "--lognormal-sigma", "1.5", "--burstiness", "0.25", "--slo-ttft-ms", "1000"]
    everyone, pair = SAL_BALANCERS, ("round-robin", "sal")
    setups = [(w, 10, 1.0, everyone) for w in (4, 8, 16)] + [(8, 1, 1.0, pair), (8, 100, 1.0, pair),
                                                             (8, 10, 2.0, everyone)]
    for workers, delay, slow, balancers in setups:
        per_worker = SAL_REQUESTS_PER_WORKER if workers < 16 else SAL_REQUESTS_PER_WORKER // 2
        for balancer in balancers:
            sal.append((f"sal/w{workers}-d{delay}-slow{slow:g}/{balancer}", [
                "--balancer", balancer, "--workers", str(workers), "--report-delay-ms", str(delay),
                "--slow-worker-factor", f"{slow:g}", "--rate", str(SAL_RATE_PER_WORKER * workers),
                "--num-requests", str(per_worker * workers), *heavy]))
    return {"slai": slai, "scls": scls, "larry": larry, "sal": sal}


def run_all(args) -> None:
    jobs = [(name, argv) for group, runs in experiments(Path(args.traces)).items()
            if group in args.only for name, argv in runs]
    jobs = [(n, a) for n, a in jobs if not (Path(args.out) / n / "results.json").exists()
            and (not args.runs or any(part in n for part in args.runs))]
    # The SLAI runs at the highest loads take longest: start them first so the pool ends together.
    jobs.sort(key=lambda j: -float(j[1][j[1].index("--rate") + 1]) if j[0].startswith("slai/") else 0)
    start = time.time()

    def one(job):
        name, argv = job
        out = Path(args.out) / name
        if (out / "results.json").exists():  # done meanwhile by another invocation
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "loadgen", "simulate", *argv, "--seeds", str(args.seeds), "--summary-only",
               "--output", str(out)]
        print(f"[{time.time() - start:7.1f}s] start {name}: {shlex.join(cmd[1:])}", flush=True)
        with open(f"{out}.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"[{time.time() - start:7.1f}s] done  {name} (rc {rc})", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))
    print(f"all runs done in {time.time() - start:.0f} s", flush=True)


# ---- tables ------------------------------------------------------------------------------------------
def load(out: Path, name: str) -> dict | None:
    path = out / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def ci(r: dict, key: str, section: str = "summary", scale: float = 1.0, digits: int = 0) -> str:
    """'mean ± half-width' of a summary figure, `key` a dotted path (e.g. 'tbt_tiers.100.median_ttft_ms')."""
    m, h = r[section], r[f"{section}_ci95"]
    for part in key.split("."):
        if m is None or part not in m:
            return "-"
        m, h = m[part], h[part]
    if m is None:
        return "-"
    if isinstance(m, float) and isinstance(h, float) and not math.isnan(h):
        return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}"
    return f"{m * scale:.{digits}f}"


def paired_change(a: dict | list, b: dict | list, key: str | None) -> str:
    """a's figure relative to b's, seed by seed (the seeds share workloads): mean % change ± 95%.
    `a`, `b`: results (their seed_summaries), lists of per-seed summaries, or (key None) of numbers."""
    a, b = (x["seed_summaries"] if isinstance(x, dict) else x for x in (a, b))
    pairs = [(x, y) if key is None else (x.get(key), y.get(key)) for x, y in zip(a, b)]
    changes = [100 * (x / y - 1) for x, y in pairs if x is not None and y]
    if len(changes) < 2:
        return "-"
    m, h = mean_ci95(changes)
    return f"{m:+.0f}% ± {h:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def slai_tables(out: Path) -> str:
    parts = []
    for section, label in (("summary", "censored at 2,100 s (as the SLAI authors count)"),
                           ("summary_uncensored", "uncensored (every request, run to the end)")):
        rows = []
        for rate in SLAI_RATES:
            for policy in ("sarathi", "slai"):
                r = load(out, f"slai/{policy}-r{rate:g}")
                if r is None:
                    continue
                change = "-"
                if policy == "slai" and load(out, f"slai/sarathi-r{rate:g}") is not None:
                    change = paired_change(seed_sections(out, "slai", rate, section),
                                           seed_sections(out, "sarathi", rate, section), "median_ttft_ms")
                rows.append([f"{rate:g}", policy, ci(r, "completed", section), ci(r, "median_ttft_ms", section), change,
                             ci(r, "tbt_tiers.100.median_ttft_ms", section), ci(r, "tbt_tiers.500.median_ttft_ms", section),
                             ci(r, "mean_ttft_ms", section), ci(r, "p99_ttft_ms", section),
                             ci(r, "ttft_by_prompt.4096+.median_ttft_ms", section),
                             ci(r, "tbt_tiers.100.p99_itl_ms", section), ci(r, "tbt_tiers.500.p99_itl_ms", section),
                             ci(r, "request_throughput", section, digits=2), ci(r, "request_goodput", section, digits=2),
                             ci(r, "preemption_rate", section, digits=3)])
        parts.append(f"SLAI vs Sarathi, {label}:\n\n" + table(
            ["req/s offered", "scheduler", "completed", "median TTFT ms", "vs sarathi", "strict (100 ms) median TTFT",
             "relaxed (500 ms) median TTFT", "mean TTFT ms", "p99 TTFT ms", "median TTFT, prompts 4096+",
             "p99 ITL strict ms", "p99 ITL relaxed ms", "req/s", "goodput (TTFT ≤ 500 ms) req/s",
             "preemptions/req"], rows))
    caps, per_seed = [], {}
    for policy in ("sarathi", "slai"):
        if any(load(out, f"slai/{policy}-r{rate:g}") is None for rate in SLAI_RATES):
            continue
        row = [policy]
        for section in ("summary", "summary_uncensored"):
            c = capacity(list(SLAI_RATES), [{"seed_summaries": seed_sections(out, policy, rate, section)}
                                            for rate in SLAI_RATES], "median_ttft_ms", 500.0, True)
            per_seed[policy, section] = c["per_seed"]
            row.append(f"{c['mean']:.2f} ± {c['ci95']:.2f}" + (" (≥, met at every rate)" if c["lower_bound"] else ""))
        caps.append(row)
    if len(caps) == 2:
        caps.append(["slai vs sarathi"] + [paired_change(per_seed["slai", s], per_seed["sarathi", s], None)
                                           for s in ("summary", "summary_uncensored")])
    parts.append("Capacity: highest load with median TTFT < 500 ms and every TBT target's p99 ITL met "
                 "(per seed, interpolated; mean ± 95% over seeds):\n\n"
                 + table(["scheduler", "capacity req/s (censored)", "capacity req/s (uncensored)"], caps))
    return "\n\n".join(parts)


def seed_sections(out: Path, policy: str, rate: float, section: str) -> list[dict]:
    """Each seed's `section` from its own results.json (seed_summaries holds only `summary`)."""
    base = out / f"slai/{policy}-r{rate:g}"
    return [json.loads(p.read_text())[section] for p in sorted(base.glob("seed_*/results.json"),
                                                                 key=lambda p: int(p.parent.name[5:]))]


def scls_tables(out: Path) -> str:
    parts = []
    for regime in ("decode-heavy", "azure-conv"):
        rows, runs = [], {}
        for policy in ("scls", "ils", "static", "sls", "fcfs"):
            r = runs[policy] = load(out, f"scls/{regime}-{policy}")
            if r is None:
                continue
            rows.append([policy, ci(r, "request_throughput", digits=2), ci(r, "output_throughput"),
                         ci(r, "request_goodput", digits=2), ci(r, "mean_ttft_ms"), ci(r, "p99_ttft_ms"),
                         ci(r, "mean_tpot_ms", digits=1), ci(r, "preemption_rate", digits=3),
                         "-" if policy == "scls" or runs.get("scls") is None or r is None
                         else paired_change(runs["scls"], r, "request_throughput")])
        parts.append(f"{regime}:\n\n" + table(
            ["scheduler", "req/s", "output tok/s", "goodput req/s", "mean TTFT ms", "p99 TTFT ms", "mean TPOT ms",
             "preemptions/req", "SCLS req/s vs this"], rows))
    return "\n\n".join(parts)


def larry_tables(out: Path) -> str:
    rows = []
    for rate in LARRY_RATES:
        base = load(out, f"larry/r{rate}-fcfs")
        for name in ("fcfs", "larry", "larry-fit-check-only", "larry-smallest-first-only", "larry-no-aging",
                     "larry-oracle"):
            r = load(out, f"larry/r{rate}-{name}")
            if r is None:
                continue
            rows.append([str(rate), name, ci(r, "mean_ttft_ms"), ci(r, "p99_ttft_ms"),
                         ci(r, "ttft_by_prompt.4096+.p99_ttft_ms"), ci(r, "preemption_rate", digits=3),
                         ci(r, "request_throughput", digits=2), ci(r, "request_goodput", digits=2),
                         "-" if name == "fcfs" or base is None else paired_change(r, base, "mean_ttft_ms")])
    return table(["req/s offered", "scheduler", "mean TTFT ms", "p99 TTFT ms", "p99 TTFT, prompts 4096+",
                  "preemptions/req", "req/s", "goodput (TTFT ≤ 1 s, TPOT ≤ 100 ms)", "mean TTFT vs FCFS"], rows)


def sal_tables(out: Path) -> str:
    rows = []
    setups = dict.fromkeys(n.split("/")[1] for n, _ in experiments(Path("."))["sal"])  # in experiment order
    for setup in setups:
        base = load(out, f"sal/{setup}/round-robin")
        for balancer in SAL_BALANCERS:
            r = load(out, f"sal/{setup}/{balancer}")
            if r is None:
                continue
            w, d, slow = setup.split("-")
            rows.append([w[1:], d[1:], slow[4:], balancer, ci(r, "mean_ttft_ms"), ci(r, "p99_ttft_ms"),
                         ci(r, "mean_e2el_ms"), ci(r, "request_throughput", digits=2),
                         ci(r, "request_goodput", digits=2), ci(r, "imbalance_busy_max_over_mean", digits=3),
                         "-" if balancer == "round-robin" or base is None else paired_change(r, base, "mean_ttft_ms")])
    return table(["workers", "report delay ms", "worker 0 slowdown", "balancer", "mean TTFT ms", "p99 TTFT ms",
                  "mean E2E ms", "req/s", "goodput (TTFT ≤ 1 s)", "busy max/mean", "mean TTFT vs round-robin"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/policy")
    p.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    p.add_argument("--jobs", type=int, default=2, help="simulations at once")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", type=lambda s: s.split(","), default=["slai", "scls", "larry", "sal"])
    p.add_argument("--runs", type=lambda s: s.split(","), help="only runs whose name contains one of these")
    p.add_argument("--tables-only", action="store_true")
    args = p.parse_args()
    if not args.tables_only:
        run_all(args)
    out = Path(args.out)
    tables = {"slai": slai_tables, "scls": scls_tables, "larry": larry_tables, "sal": sal_tables}
    for group in args.only:
        print(f"\n<!-- {group} -->\n{tables[group](out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
