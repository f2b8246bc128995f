"""A ~100M-parameter Llama-shaped model directory for speed measurements where matmuls dominate: the
config and the demo model's byte-level tokenizer, no weights. Servers load it with random weights
(`--load-format dummy`, in halffull and in vLLM alike).

    python benchmarks/random_model.py      # prints the directory, creating it on first use
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.demo import CONFIG, demo_model_dir, ensure_demo_model  # noqa: E402

# Llama 3's proportions at GPT-2-small width: 12 layers of 768, grouped-query attention, a tied 32k vocabulary.
LLAMA_100M = CONFIG | {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": True}


def num_parameters(c: dict) -> int:
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * c["intermediate_size"] + 2 * h
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h


def ensure_random_model() -> Path:
    path = demo_model_dir().parent / "llama-100m-random"
    if not (path / "config.json").is_file():
        demo = ensure_demo_model()
        path.mkdir(parents=True, exist_ok=True)
        for f in demo.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, path / f.name)
        (path / "config.json").write_text(json.dumps(LLAMA_100M, indent=2))  # written last: marks it complete
    return path


if __name__ == "__main__":
    print(ensure_random_model())
    print(f"{num_parameters(LLAMA_100M) / 1e6:.0f}M parameters", file=sys.stderr)
