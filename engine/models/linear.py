"""Linear layers whose weights can be packed once for oneDNN on CPU.

`F.linear` on CPU goes to a BLAS sgemm that repacks the weight matrix into its blocked layout on every
call; at decode batch sizes (tens of rows) that repacking costs about as much as the product itself.
oneDNN (mkldnn) takes the weight packed once, at load time. Measured on this repository's 2-core
machine, one thread, 32 rows x 768 -> 4096 features: 14-27 ms packed against 26-53 ms with F.linear
(a busy machine: compare the ranges, not the values); the ~100M model's LM head (32,000 rows): 156-216
against 359-462 ms. Results differ from F.linear's in the last bits (summation order), as any other BLAS
would. The packed weight replaces the parameter (no second copy), so only the model's own forward can
use it; the tied LM head keeps a packed copy beside the embedding table it shares.

The cost, and why it is off by default (`--cpu-prepack-weights` turns it on): oneDNN builds and caches a
primitive per weight and per number of rows, about 0.6 MB each (measured: 512 row counts over two weights
grew the process by 630 MB), so a server that sees many batch sizes grows by hundreds of megabytes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    if x.dim() == 2:  # the model's activations: [tokens, features]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [None], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """nn.Linear, or after `prepack` the same product through oneDNN over the packed weight."""

    def prepack(self) -> None:
        self.weight = nn.Parameter(pack(self.weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

