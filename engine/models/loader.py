"""Build a model from a local Hugging Face directory: config, then safetensors weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..parallel import TPGroup
from .llama import LlamaForCausalLM


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"weights file(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files


def iter_weights(files: list[Path]):
    """(name, slice) pairs: a safetensors slice reads from the file only the part that is indexed, so a
    tensor-parallel rank reads only its shard."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def load_model(config: ModelConfig, backend, device: torch.device, max_positions: int,
               random_weights: bool = False, tp: TPGroup = TPGroup()) -> LlamaForCausalLM:
    """`random_weights` skips the checkpoint (the shapes alone matter for speed measurements)."""
    files = [] if random_weights else weight_files(config.path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, backend, max_positions, tp)
    finally:
        torch.set_default_dtype(previous)
    # Serving never trains: parameters that require grad would make every forward outside
    # inference_mode record autograd state (a CUDA graph captured that way keeps activations alive).
    model.requires_grad_(False)
    if random_weights:
        for p in model.parameters():  # small values keep activations finite in any dtype
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    else:
        model.load_weights(iter_weights(files))
    return model.eval()
