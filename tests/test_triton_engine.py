"""The engine with the Triton attention backend (run by Triton's interpreter on CPU, compiled with CUDA
graphs on a GPU) produces the same greedy tokens as the torch reference backend, through prefill chunks,
decodes and mixed steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch
from engine import LLM, SamplingParams
from test_engine_hf import mixed_prompts
gpu = torch.cuda.is_available()
# On a GPU (compiled kernels) the whole prompt set and longer outputs: cheap there.
prompts = mixed_prompts(n=16 if gpu else 6)
params = SamplingParams(temperature=0.0, max_tokens=24 if gpu else 6, ignore_eos=True)
out = {}
for backend in ("torch", "triton"):
    llm = LLM(sys.argv[1], dtype="float32", attention_backend=backend, num_kv_blocks=128, max_num_batched_tokens=96)
    runner = llm.engine.runner
    assert runner.backend.name == backend
    # The fast path on a GPU is compiled Triton replayed through CUDA graphs; the reference runs eagerly.
    assert (runner.graphs is not None) == (gpu and backend == "triton"), (backend, runner.graphs)
    out[backend] = [o.token_ids for o in llm.generate(prompts, params)]
print(json.dumps(out))
"""


def test_triton_backend_matches_torch_backend(tiny_models):
    root = Path(__file__).resolve().parent.parent
    # TRITON_INTERPRET comes from conftest: set on CPU only.
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_models["qwen3"])], capture_output=True, text=True,
                          env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["triton"] == out["torch"]
