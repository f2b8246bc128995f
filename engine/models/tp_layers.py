"""Tensor-parallel layers (Megatron-LM's split). A column-parallel linear layer (fused QKV by heads,
gate/up by columns) needs nothing beyond nn.Linear with this rank's output features: its outputs stay
split, and the next layer, row-parallel, takes them split and sums its partial outputs over the ranks.
The vocabulary is split in contiguous ranges of ceil(V / N) rows, the last padded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import TPGroup
from .linear import Linear, linear, pack


class RowParallelLinear(Linear):
    """y = x W^T, with x and W split along the input features (this rank's heads or MLP columns)."""

    def __init__(self, in_features_local: int, out_features: int, tp: TPGroup):
        super().__init__(in_features_local, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table; doubles as the (tied or untied) LM head's shard."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.shard = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard
        self.num_rows = max(0, min(self.shard, vocab_size - self.start))  # rows past the vocabulary are padding
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)  # each token's row comes from exactly one rank

    head_weight: torch.Tensor | None = None  # the weight packed for the LM head (engine/models/linear.py)

    def prepack_head(self, tied: bool) -> None:
        if tied:  # the embedding lookup still needs the plain table
            self.head_weight = pack(self.weight)
        else:  # only ever the head: the packed weight replaces the table
            self.weight = nn.Parameter(pack(self.weight), requires_grad=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits on every rank."""
        weight = self.weight if self.head_weight is None else self.head_weight
        return self.tp.all_gather(linear(hidden, weight).float())[..., :self.vocab_size]
