#!/usr/bin/env bash
# Everything issue #16 owes a GPU, in ONE device call: the compiled Triton kernels against the torch
# reference, the fast path (compiled Triton + CUDA graphs) token-identical to the torch reference path
# on a float32 model and to transformers, then benchmarks/gpu.py's three tables (batch-1 decode and
# decode steps against the measured-bandwidth bound, Azure offline throughput beside transformers'
# continuous batching). Every log and table lands in $OUT as it finishes, so a run cut short keeps
# what it measured.
#
# Before the call, once, in the repo root (the device gets only the checkout, not ../shared):
#   mkdir -p .whl .traces && cp ../shared/device-wheels/*.whl .whl/ && cp ../shared/traces/azure_llm_2023_conv.csv .traces/
#   grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#   grep -qx '/.traces/' .git/info/exclude || echo '/.traces/' >> .git/info/exclude
# The call (device tool `run`): command "bash benchmarks/gpu_session.sh", carry [".whl", ".traces"],
# timeout_s 600. The stages are capped at 540 s together (tests 140, decode 80, steps 120, azure 200 of
# which transformers gets 120), so the call ends inside its limit with every finished table returned.
# Then copy the tables from the returned files into BENCHMARKS.md (date, GPU and the commands are in
# them and in session.log).
#
# Here, on CPU: `bash benchmarks/gpu_session.sh --dry-run` runs the same stages on tiny shapes (the
# kernel tests interpreted), output in out/gpu-session-dry; a check of the script, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 1 ]]; then
    OUT=${OUT:-out/gpu-session-dry}
    PY=${PYTHON:-.venv/bin/python}
    TRACE=../shared/traces/azure_llm_2023_conv.csv
    TESTS=(tests/test_triton_kernels.py tests/test_model_runner.py tests/test_triton_engine.py)
    BENCH=(--tiny --max-model-len 512 --input-len 16 --output-len 16 --batches 1,4 --context 64 --num-requests 6
           --hf-time-limit 60)
    LIMITS=(400 200 200 200)
else
    OUT=${OUT:?run through the device tool, which sets OUT}
    PY=python3
    TRACE=.traces/azure_llm_2023_conv.csv
    TESTS=(tests/test_triton_kernels.py tests/test_model_runner.py tests/test_triton_engine.py tests/test_engine_hf.py
           tests/test_engine.py)
    BENCH=(--hf-time-limit 120)
    LIMITS=(140 80 120 200)
    # The image lacks msgspec, starlette, uvicorn, openai: the wheels from ../shared/device-wheels.
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"

stage() {  # stage NAME SECONDS CMD...: run with a time cap, output into session.log and the terminal
    local name=$1 limit=$2
    shift 2
    echo "=== $(date -u +%FT%TZ) $name: $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name exit $rc" | tee -a "$LOG"
}

{
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$LOG"

# 1. Compiled kernels vs the torch reference (no recompiles once warm); the fast path token-identical to
#    the torch reference path on float32 (test_triton_engine) and to transformers (test_engine_hf).
stage tests "${LIMITS[0]}" $PY -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/tests.xml"
# 2. Batch-1 decode, then decode steps at B in {1,8,32,128,256}, L=1024, against the measured bound.
stage decode "${LIMITS[1]}" $PY benchmarks/gpu.py decode --out "$OUT" "${BENCH[@]}"
stage steps "${LIMITS[2]}" $PY benchmarks/gpu.py steps --out "$OUT" "${BENCH[@]}"
# 3. Azure offline throughput, 200 requests, beside transformers' continuous batching.
stage azure "${LIMITS[3]}" $PY benchmarks/gpu.py azure --trace "$TRACE" --out "$OUT" "${BENCH[@]}"
ls -la "$OUT" | tee -a "$LOG"
