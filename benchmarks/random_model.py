"""A ~100M-parameter Llama-shaped model directory for speed measurements where matmuls dominate: the
config and a byte-level tokenizer with a token for every one of the 32,000 ids, no weights. Servers load
it with random weights (`--load-format dummy`, in halffull and in vLLM alike).

Every id must decode to some text: a client that counts streamed text (loadgen) sees a request whose
tokens all decode to nothing as one that produced no output. Ids past the 256 bytes are two-byte strings
that encoding never produces (no merges), so prompts stay one token per byte.

    python benchmarks/random_model.py      # prints the directory, creating it on first use
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.demo import CONFIG, SPECIAL_TOKENS, demo_model_dir, write_tokenizer  # noqa: E402

VOCAB = 32000
SPECIAL = {name: VOCAB - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}  # the last ids
# Llama 3's proportions at GPT-2-small width: 12 layers of 768, grouped-query attention, a tied 32k vocabulary.
LLAMA_100M = CONFIG | {
    "vocab_size": VOCAB, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": True,
    "bos_token_id": SPECIAL["<|bos|>"], "eos_token_id": SPECIAL["<|eos|>"], "pad_token_id": SPECIAL["<|pad|>"]}


def num_parameters(c: dict) -> int:
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * c["intermediate_size"] + 2 * h
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h


def ensure_random_model() -> Path:
    path = demo_model_dir().parent / "llama-100m-random-v2"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        write_tokenizer(path, VOCAB)
        (path / "config.json").write_text(json.dumps(LLAMA_100M, indent=2))  # written last: marks it complete
    return path


if __name__ == "__main__":
    print(ensure_random_model())
    print(f"{num_parameters(LLAMA_100M) / 1e6:.0f}M parameters", file=sys.stderr)
