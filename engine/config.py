"""Model configuration read from a Hugging Face `config.json`, and the engine's own arguments."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2/2.5
    qk_norm: bool  # Qwen3
    dtype: torch.dtype
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, path: str | Path, dtype: str = "auto") -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in {path}: --model must be a local Hugging Face model directory")
        raw = json.loads(config_file.read_text())
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {config_file}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: default, llama3, linear")
        num_heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        gen_config = path / "generation_config.json"
        if gen_config.is_file():  # Llama 3 instruct lists its end-of-turn tokens only here
            g = json.loads(gen_config.read_text()).get("eos_token_id")
            eos_ids |= frozenset(g if isinstance(g, list) else [] if g is None else [g])
        if dtype == "auto":
            torch_dtype = DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
        return cls(
            path=path, architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=torch_dtype, eos_token_ids=eos_ids,
        )


@dataclass
class EngineArgs:
    """Engine settings; names follow vLLM's command-line flags."""
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # 2048 on GPU, 512 on CPU
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_gb: float | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    prefix_cache_hash_salt: str = ""  # mixed into every prefix-cache digest of this server
    scheduler: str = "fcfs"
    scheduler_knobs: dict = field(default_factory=dict)
    output_length: str = "history"  # what length predictions may know (scheduling/output_length.py)
    attention_backend: str = "auto"
    enforce_eager: bool = False
    load_format: str = "auto"  # "dummy": random weights in the checkpoint's shapes (benchmarks)
    tensor_parallel_size: int = 1  # ranks (processes, GPUs) per worker, each holding a shard of the model
    # CPU: a step with at least this much matmul work per token (GFLOP) computes on all the worker's intra-op
    # threads, a lighter one on one thread fewer, leaving that core to the HTTP server (see
    # ModelRunner.step_threads). None: no step takes the last core.
    cpu_parallel_min_gflop_per_token: float | None = 0.05
    # CPU: linear weights packed once for oneDNN, rows padded to a few sizes whose kernels are built at
    # start-up (engine/models/linear.py). False: F.linear.
    cpu_prepack_weights: bool = True
    structured_outputs_backend: str = "auto"  # auto | xgrammar | guidance
    seed: int = 0
    step_log: str | None = None  # a directory: each engine appends one JSON line per step (engine/step_log.py)

    def token_budget(self, device: torch.device | str) -> int:
        """max_num_batched_tokens as given, else the default for the device."""
        return self.max_num_batched_tokens or (2048 if torch.device(device).type == "cuda" else 512)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
