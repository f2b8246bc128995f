"""`cpu` attention backend: a C++ kernel (cpu_paged_attention.cpp) that stores the step's K/V and attends
through the block table in one call, reading the cache in place (the torch backend gathers a padded copy).

The kernel is compiled on first use with -O3 -march=native into torch's extensions directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), under a name keyed by the hash of the source,
the flags and the torch version: compiled once per machine, then loaded by every process (torch's build
lock makes concurrent first users wait for one build).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP inline


def load_kernel():
    """torch.ops.halffull_cpu.paged_attention, compiling it first if this machine has not."""
    if hasattr(torch.ops.halffull_cpu, "paged_attention"):  # already loaded in this process
        return torch.ops.halffull_cpu.paged_attention
    from torch.utils import cpp_extension
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode())
    name = f"halffull_cpu_attention_{key.hexdigest()[:16]}"
    start = time.monotonic()
    cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    log.info("cpu paged-attention kernel %s ready in %.1f s", name, time.monotonic() - start)
    return torch.ops.halffull_cpu.paged_attention


class CpuAttentionBackend:
    name = "cpu"
    supports_cuda_graphs = False

    def __init__(self):
        self._kernel = load_kernel()  # RuntimeError / OSError if it does not compile: the caller falls back

    def forward(self, q, k, v, k_cache, v_cache, meta, scale) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, H, D], after storing k/v."""
        return self._kernel(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
                            meta.block_tables, scale)
