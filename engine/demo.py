"""The built-in demo model, served when no --model is given: a small Llama with random weights
from a fixed seed, a byte-level tokenizer and a plain chat template. Its text is gibberish; it
exists so that everything runs out of the box and offline. Created on first use, atomically, in
$HALFFULL_CACHE (default ~/.cache/halffull)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

VERSION = 1
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256 + len(SPECIAL_TOKENS),
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
    "pad_token_id": 258, "torch_dtype": "float32", "hidden_act": "silu",
}


def demo_model_dir() -> Path:
    root = Path(os.environ.get("HALFFULL_CACHE", Path.home() / ".cache" / "halffull"))
    return root / f"demo-v{VERSION}"


def ensure_demo_model() -> Path:
    path = demo_model_dir()
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
    try:
        _write(tmp)
        os.rename(tmp, path)  # atomic: concurrent creators race harmlessly
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write(path: Path) -> None:
    c = CONFIG
    gen = torch.Generator().manual_seed(0)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.5 / shape[-1] ** 0.5

    weights = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=gen),
               "model.norm.weight": torch.ones(h),
               # Small output weights keep the logits soft, so sampling at temperature 1 varies.
               "lm_head.weight": rand(c["vocab_size"], h) * 4}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i),
                    p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)}
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c, indent=2))
    write_tokenizer(path)


def write_tokenizer(path: Path, vocab_size: int = CONFIG["vocab_size"]) -> None:
    """A byte-level BPE tokenizer without merges: exactly one token per byte, so any text round-trips.
    A larger `vocab_size` fills the ids between the bytes and the special tokens (which come last) with
    two-byte strings that encoding never produces, so every id of a bigger random model decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: b for b, ch in enumerate(byte_chars)}
    pairs = (a + b for a in byte_chars for b in byte_chars)
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        vocab[next(pairs)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")
    assert len(fast) == vocab_size
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = CONFIG["max_position_embeddings"]
    fast.save_pretrained(str(path))


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (printable bytes map to themselves,
    the rest are shifted above 255)."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
