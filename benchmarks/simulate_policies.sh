#!/usr/bin/env bash
# The simulator comparisons of BENCHMARKS.md: engine policies on one H100 (issue 4) and balancers
# over four (issue 5). Each run writes $OUT/<name>/results.json and plots; the tables the sections
# quote are printed at the end.
#   benchmarks/simulate_policies.sh [engine|balancers|all]
# Environment: PYTHON (python), TRACES (../shared/traces), OUT (out/simulate), JOBS (2 runs at once).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TRACES=${TRACES:-../shared/traces}
OUT=${OUT:-out/simulate}
JOBS=${JOBS:-2}
WHAT=${1:-all}
CONV=$TRACES/azure_llm_2023_conv.csv
CODE=$TRACES/azure_llm_2023_code.csv
mkdir -p "$OUT"

sim() {  # sim NAME ARGS...: one simulation in the background, at most $JOBS at a time
  local name=$1; shift
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  echo "python -m loadgen simulate $* --output $OUT/$name" >&2
  "$PYTHON" -m loadgen simulate "$@" --output "$OUT/$name" > "$OUT/$name.log" 2>&1 &
}

table() {  # table COLUMNS RUN...: one markdown row per run; COLUMNS are summary keys
  "$PYTHON" - "$OUT" "$@" <<'EOF'
import json, sys
out, columns, runs = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
def cell(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):  # tbt_tiers: p99 ITL per target, and whether it is met
        return ", ".join(f"{t} ms: {x['p99_itl_ms']:.0f} ({'met' if x['met'] else 'missed'})" for t, x in v.items())
    return str(v)
print("| run | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for run in runs:
    s = json.load(open(f"{out}/{run}/results.json"))["summary"]
    print(f"| {run} | " + " | ".join(cell(s.get(c)) for c in columns) + " |")
EOF
}

# Issue 4: the conversation trace's first 5000 requests at 0.32x their recorded gaps (about 15 req/s)
# on one H100. The KV pool is cut to 150,000 tokens (what a 40 GB card keeps after the weights) so
# that memory, not the 256-request cap, is the constraint and FCFS preempts. TBT targets as in the
# SLAI paper: 5% of requests 100 ms, the rest 500 ms (only SLAI reads them).
ENGINE=(--workload "$CONV" --num-requests 5000 --replay-timestamps --time-scale 0.32 --kv-tokens 150000
        --tbt-slo-ms 500 --strict-tbt-frac 0.05 --strict-tbt-ms 100)
# Capacity: 2000 requests all at once.
SATURATED=(--workload "$CONV" --num-requests 2000 --rate inf --kv-tokens 150000)
SCALES=(0.5 0.4 0.35 0.3)  # Sarathi vs SLAI load sweep, besides 0.32
if [[ $WHAT == engine || $WHAT == all ]]; then
  for s in fcfs larry sarathi slai sls scls; do sim "engine-$s" --scheduler "$s" "${ENGINE[@]}"; done
  for s in fcfs sls scls; do sim "saturated-$s" --scheduler "$s" "${SATURATED[@]}"; done
  for x in "${SCALES[@]}"; do
    for s in sarathi slai; do
      sim "sweep-$s-$x" --scheduler "$s" "${ENGINE[@]}" --time-scale "$x"
    done
  done
fi

# Issue 5: four H100 workers (FCFS each, full KV), whole traces at a load near saturation:
# conversation at 0.08x its recorded gaps (about 69 req/s), code at 0.05x (about 51 req/s).
BALANCERS=(sal round-robin power-of-two least-loaded random scls)
if [[ $WHAT == balancers || $WHAT == all ]]; then
  for b in "${BALANCERS[@]}"; do
    sim "conv4-$b" --balancer "$b" --workers 4 --workload "$CONV" --replay-timestamps --time-scale 0.08
    sim "code4-$b" --balancer "$b" --workers 4 --workload "$CODE" --replay-timestamps --time-scale 0.05
  done
fi
wait

if [[ $WHAT == engine || $WHAT == all ]]; then
  echo; echo "### Engine policies at 0.32x"
  table mean_ttft_ms,median_ttft_ms,p99_ttft_ms,num_preemptions,preemption_rate,request_throughput,output_throughput,p99_itl_ms,tbt_tiers \
    engine-fcfs engine-larry engine-sarathi engine-slai engine-sls engine-scls
  echo; echo "### Capacity, 2000 requests at once"
  table duration,request_throughput,output_throughput,total_token_throughput,num_preemptions saturated-fcfs saturated-sls saturated-scls
  echo; echo "### Sarathi vs SLAI load sweep"
  runs=()
  for x in "${SCALES[@]:0:3}" 0.32 "${SCALES[@]:3}"; do
    for s in sarathi slai; do [[ $x == 0.32 ]] && runs+=("engine-$s") || runs+=("sweep-$s-$x"); done
  done
  table request_throughput,median_ttft_ms,mean_ttft_ms,p99_itl_ms,num_preemptions,tbt_tiers "${runs[@]}"
fi
if [[ $WHAT == balancers || $WHAT == all ]]; then
  cols=mean_ttft_ms,p99_ttft_ms,mean_e2el_ms,imbalance_busy_max_over_mean,imbalance_busy_cv,imbalance_tokens_max_over_mean,imbalance_tokens_cv
  echo; echo "### Conversation trace, 4 workers"
  table "$cols" "${BALANCERS[@]/#/conv4-}"
  echo; echo "### Code trace, 4 workers"
  table "$cols" "${BALANCERS[@]/#/code4-}"
fi
