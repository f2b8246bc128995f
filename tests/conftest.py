"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers' own classes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Keep each test process on few threads: CI has two cores and several processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


# Without a GPU the Triton kernels are tested on CPU through Triton's interpreter, which is chosen when
# triton is first imported; transformers imports it long before tests/test_triton_kernels.py is
# collected. With a GPU they compile for real: the engine tests then run the fast path with CUDA graphs,
# which the interpreter could not be captured in.
if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def build_tiny_model(arch: str, path: Path, vocab_size: int = 512, tie: bool = False, num_kv_heads: int = 2) -> Path:
    """Save a tiny random model of `arch` (llama, mistral, qwen2, qwen3) to `path`."""
    import torch
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        config = tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        config, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = tf.Qwen3Config(**common, head_dim=32), tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(config).float().eval()
    with torch.no_grad():  # biases and norms start at 0/1; perturb them so loading them matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.05 if "embed" not in name else 1.0)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("llama", "mistral", "qwen2", "qwen3")}


@pytest.fixture
def conv_trace() -> Path:
    """The shared Azure conversation trace. CI lays ../shared beside the repo, so a test that needs it fails
    without it (shown by pointing the path at a missing file) rather than skipping unnoticed."""
    from server_utils import CONV_TRACE
    if not CONV_TRACE.exists():
        pytest.fail(f"{CONV_TRACE} is missing: this test needs the shared traces beside the repo (see README)")
    return CONV_TRACE
