"""One decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Runs on a flattened batch: `input_ids` and `positions` of every scheduled token of every sequence
back to back, attention through the paged KV cache described by the step's metadata.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel import TPGroup, check_shardable, shard_heads
from .linear import Linear
from .tp_layers import RowParallelLinear, VocabParallelEmbedding


class RMSNorm(nn.Module):
    """Root-mean-square norm. Given the residual stream too, it first adds `x` to it and returns the sum
    as the new residual (vLLM's fused add+RMSNorm): the layer's residual adds ride on its norms."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
        residual = x
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps), residual  # one op
        # Normalize in float32 and scale in the input dtype, as the reference implementation does.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype), residual


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, a smooth ramp between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding. The step's cos/sin rows are looked up once (`tables`) and shared by
    every layer; `apply` rotates queries and keys together, as one [T, heads, D] tensor."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
        # rotate_half(x) * sin == flip_halves(x) * [-sin, sin]: the sign is folded into the table.
        self.register_buffer("cos_sin", torch.stack([torch.cat([freqs.cos(), freqs.cos()], -1),
                                                     torch.cat([-freqs.sin(), freqs.sin()], -1)], 1),
                             persistent=False)  # [P, 2, D]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin[positions].to(dtype).unsqueeze(2)  # [T, 2, 1, D]
        return cos_sin[:, 0], cos_sin[:, 1]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, n, D] -> x * cos + rotate_half(x) * sin, in a new tensor."""
        flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return (x * cos).addcmul_(flipped, sin)


class Attention(nn.Module):
    """This rank's query heads and the KV heads they use: QKV column-parallel, o_proj row-parallel."""

    def __init__(self, config: ModelConfig, backend, tp: TPGroup):
        super().__init__()
        self.num_heads, self.num_kv_heads, _ = shard_heads(config.num_heads, config.num_kv_heads, tp)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim ** -0.5
        self.backend = backend

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache, meta):
        qkv = self.qkv_proj(x)
        qk = qkv[:, :self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim))  # [T, H + Hkv, D]
        v = qkv[:, self.q_size + self.kv_size:].unflatten(-1, (-1, self.head_dim))
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q)[0], self.k_norm(k)[0]], dim=1)
        q, k = Rotary.apply(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    """This rank's columns of gate/up (column-parallel) and rows of down_proj (row-parallel)."""

    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.intermediate = config.intermediate_size // tp.size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = RowParallelLinear(self.intermediate, config.hidden_size, tp)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: no new [T, I] tensors


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, residual, rope, kv_cache, meta):
        """(this layer's output, the residual stream before it): the add that joins them is left to the
        next layer's first norm, or to the final norm."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend, max_positions: int, tp: TPGroup = TPGroup()):
        super().__init__()
        check_shardable(config, tp.size)
        self.config, self.tp = config, tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, backend, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config, max_positions)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """The last layer's residual stream, before the final norm: `compute_logits` normalizes only the
        rows it scores."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.norm(hidden)
        return (self.embed_tokens if self.lm_head is None else self.lm_head).logits(hidden)

    def prepack_weights(self) -> list[torch.Tensor]:
        """CPU: every linear layer's weight and the LM head's packed once for oneDNN (engine/models/linear.py);
        returns the packed weights. After this the weights can no longer be loaded."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack()
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        head.prepack_head(tied=self.lm_head is None)
        packed_head = head.weight if head.head_weight is None else head.head_weight
        return [m.weight for m in self.modules() if isinstance(m, Linear)] + [packed_head]

    # ---- weights ----------------------------------------------------------------------------
    def weight_layout(self) -> dict[str, tuple[str, int, int, int, int]]:
        """Where this rank's part of each Hugging Face weight goes, by the module name in the checkpoint:
        (parameter's module, offset in it, dimension split, start in the checkpoint's tensor, size)."""
        cfg, tp = self.config, self.tp
        heads, kv_heads, first_kv = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp)
        q, kv, kv_start = heads * cfg.head_dim, kv_heads * cfg.head_dim, first_kv * cfg.head_dim
        inter = cfg.intermediate_size // tp.size
        vocab = self.embed_tokens
        return {"q_proj": ("qkv_proj", 0, 0, tp.rank * q, q), "k_proj": ("qkv_proj", q, 0, kv_start, kv),
                "v_proj": ("qkv_proj", q + kv, 0, kv_start, kv), "o_proj": ("o_proj", 0, 1, tp.rank * q, q),
                "gate_proj": ("gate_up_proj", 0, 0, tp.rank * inter, inter),
                "up_proj": ("gate_up_proj", inter, 0, tp.rank * inter, inter),
                "down_proj": ("down_proj", 0, 1, tp.rank * inter, inter),
                "embed_tokens": ("embed_tokens", 0, 0, vocab.start, vocab.num_rows),
                "lm_head": ("lm_head", 0, 0, vocab.start, vocab.num_rows)}

    def load_weights(self, weights) -> None:
        """Copy (name, tensor) pairs in Hugging Face naming into this model, fusing q/k/v and gate/up
        projections and keeping only this rank's shard. A tensor may be a safetensors slice: then only the
        shard is read. Every parameter must be covered."""
        params = dict(self.named_parameters())
        layout = self.weight_layout()
        loaded: set[tuple[str, int]] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in layout:
                target, offset, dim, start, size = layout[parts[-2]]
                pname = ".".join(parts[:-2] + [target, parts[-1]])
                if pname not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                dest = params[pname].data
                if dim == 0:
                    dest[offset:offset + size].copy_(tensor[start:start + size])
                else:
                    dest.copy_(tensor[:, start:start + size])
            elif name in params:
                pname, offset = name, 0
                params[name].data.copy_(tensor[:])
            else:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            loaded.add((pname, offset))
        # A fused parameter is complete when all its parts came.
        expected = {(p, 0) for p in params}
        expected |= {(p, layout[part][1]) for p in params for part in ("k_proj", "v_proj", "up_proj")
                     if p.split(".")[-2] == layout[part][0]}
        missing = sorted({p for p, _ in expected - loaded})
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
