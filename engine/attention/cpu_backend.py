"""`cpu` attention backend: a C++ kernel (cpu_paged_attention.cpp) that stores the step's K/V and attends
through the block table in one call, reading the cache in place (the torch backend gathers a padded copy).

The kernel is compiled on first use with -O3 -march=native (about 15 s) into torch's extensions directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, in halffull/), as a library named by the hash of the
source, the flags and the torch version: compiled once per machine, then loaded by every process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")
# -fopenmp: at::parallel_for is inline OpenMP. -ffast-math compiles only: linked with it, gcc 12 adds a
# constructor that turns on flush-to-zero for the whole process.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def load_kernel():
    """torch.ops.halffull_cpu.paged_attention, compiling it first if this machine has not."""
    if hasattr(torch.ops.halffull_cpu, "paged_attention"):  # already loaded in this process
        return torch.ops.halffull_cpu.paged_attention
    from torch.utils import cpp_extension
    # -march=native: a cache directory copied to a machine with other vector units must not match.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()
                         + torch.backends.cpu.get_cpu_capability().encode())
    name = f"halffull_cpu_attention_{key.hexdigest()[:16]}"
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / "halffull"
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"{name}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return torch.ops.halffull_cpu.paged_attention
    # Built in a directory of its own and renamed into place when complete: a process killed while
    # compiling leaves no lock behind for the next one to wait on (torch's build lock would), and
    # processes that start together at most compile it more than once.
    start = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache))
    try:
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), is_python_module=False, verbose=False)
        os.replace(build / f"{name}.so", library)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("compiled the cpu paged-attention kernel into %s in %.1f s", library, time.monotonic() - start)
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
