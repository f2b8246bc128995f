"""Linear layers whose weights can be packed once for oneDNN on CPU.

`F.linear` on CPU goes to a BLAS sgemm that repacks the weight matrix into its blocked layout on every
call; at decode batch sizes (tens of rows) that repacking costs about as much as the product itself.
oneDNN (mkldnn) takes the weight packed once, at load time. Measured on this repository's 2-core
machine, one thread, 32 rows x 768 -> 4096 features: 14-27 ms packed against 26-53 ms with F.linear
(a busy machine: compare the ranges, not the values); the ~100M model's LM head (32,000 rows): 156-216
against 359-462 ms. Results differ from F.linear's in the last bits (summation order), as any other BLAS
would. The packed weight replaces the parameter (no second copy), so only the model's own forward can
use it; the tied LM head keeps a packed copy beside the embedding table it shares.

The cost: oneDNN builds a kernel per weight shape and per number of rows (about 0.8 MB each; 256 row
counts over three weight shapes grew a process by 640 MB). So the rows are padded up to one of a few
sizes (`bucket_rows`: exact up to 32, then sixteen sizes per doubling, less than 6.25% padding; 96 sizes
up to 512 rows; four per doubling padded the ~100M model's mixed steps by 21%, which cost more than the
packing saved). That bounds the memory (the ~100M model's five weight shapes at every size up to 512:
131 MB), and `warm_up` builds the kernels of the smaller sizes before the server takes requests, as many
as WARM_UP_FLOPS of products allow (all of them for the demo model), so that steady serving meets no new
ones; the rest are built on first use.
`--no-cpu-prepack-weights` keeps F.linear."""

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


def bucket_rows(n: int) -> int:
    """The number of rows a packed product runs on: n up to 32, then n rounded up to a sixteenth of its
    power of two (34, 36, ..., 64, 68, 72, ...), so a server meets at most 96 row counts up to 512."""
    step = 1 << max(0, n.bit_length() - 5)
    return -(-n // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # the model's activations are [tokens, features] already
    n = rows.shape[0]
    padded = bucket_rows(n)
    if padded != n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, rows.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [None], "")[:n]
    return out.view(*x.shape[:-1], out.shape[-1])


# Start-up budget for warm_up: about a second of products on one core. Building every size up to 512
# would cost the ~100M model 9 s and a 1B one minutes.
WARM_UP_FLOPS = 100e9


def warm_up(weights: list[torch.Tensor], max_rows: int) -> None:
    """Run every packed weight shape once at each row count up to max_rows, smallest first, within
    WARM_UP_FLOPS: oneDNN builds those kernels now, not under load."""
    shapes = {(w.shape[0], w.shape[1], w.dtype): w for w in weights if w.is_mkldnn}
    flops_per_row = sum(2 * out_features * in_features for out_features, in_features, _ in shapes)
    spent = 0
    for n in sorted({bucket_rows(n) for n in range(1, max_rows + 1)}):
        spent += n * flops_per_row
        if spent > WARM_UP_FLOPS:
            return
        for (_, in_features, dtype), w in shapes.items():
            linear(torch.zeros(n, in_features, dtype=dtype), w)


class Linear(nn.Linear):
    """nn.Linear, or after `prepack` the same product through oneDNN over the packed weight."""

    def prepack(self) -> None:
        self.weight = nn.Parameter(pack(self.weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

