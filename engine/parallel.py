"""Tensor parallelism: one worker becomes a group of N ranks, each a process holding a shard of the model.

Rank 0 is the worker itself: it runs the scheduler, prepares each step's inputs, broadcasts them, runs its
shard of the forward pass together with the others, and alone samples. It starts ranks 1..N-1 as child
processes (`python -m engine.parallel`), which only receive step inputs and run the forward pass until told
to stop. Collectives run on torch.distributed (NCCL between GPUs, gloo on CPU); the step inputs, host-side
lists, always go through a gloo group. The rendezvous is on 127.0.0.1 on a free port.

A dead rank takes the whole group down, as one dead worker: rank 0 notices (a thread waits on each child)
and exits, the server fails its requests and restarts it; the other ranks die with their parent
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from .config import EngineArgs

log = logging.getLogger(__name__)

# Set in a worker process: there a dead rank ends the process, so the server sees one dead worker. In-process
# (offline LLM) the group's next step raises instead.
EXIT_ON_RANK_DEATH = False


class RankLaunch(msgspec.Struct):
    """What rank 0 tells a rank it starts, as JSON on the child's stdin."""
    rank: int
    size: int
    port: int
    model_path: str
    args: EngineArgs
    max_model_len: int
    threads: int
    log_level: int


@dataclass
class TPGroup:
    """This process's place in its tensor-parallel group; with size 1 every collective is a no-op."""
    rank: int = 0
    size: int = 1
    cpu_group: object = None  # gloo group for host-side objects (None: the default group is gloo already)
    children: list[subprocess.Popen] = field(default_factory=list)  # rank 0: ranks 1..N-1
    closing: bool = False
    failure: str | None = None  # rank 0 in-process (offline LLM): why the group broke

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, concatenated along the last dimension in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast(self, obj=None):
        """Rank 0 sends `obj`, every other rank returns it."""
        if self.failure:
            raise RuntimeError(self.failure)
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Rank 0's `t` into every rank's `t` (a contiguous tensor, on the device)."""
        if t.numel():
            dist.broadcast(t, src=0)

    def close(self, kill: bool = False) -> None:
        """Rank 0: tell the other ranks to exit (or kill them, when they may be inside another collective),
        and wait for them."""
        if self.rank != 0 or self.size == 1 or self.closing:
            return
        self.closing = True
        if kill:
            for c in self.children:
                c.kill()
        elif all(c.poll() is None for c in self.children):
            self.broadcast(None)
        for c in self.children:
            try:
                c.wait(10.0)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        dist.destroy_process_group()

    def _watch(self, child: subprocess.Popen, rank: int) -> None:
        code = child.wait()
        if self.closing:
            return
        self.failure = f"tensor-parallel rank {rank} exited with code {code}; the group is down"
        log.error(self.failure)
        if EXIT_ON_RANK_DEATH:  # a worker: die as a whole, so the server fails its requests and restarts it
            os._exit(1)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a group whose rank 0 is on cuda:k runs on cuda:k+r."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def check_shardable(config, size: int) -> None:
    if config.num_heads % size or (config.num_kv_heads % size and size % config.num_kv_heads):
        raise ValueError(f"tensor parallel size {size} must divide the number of attention heads "
                         f"({config.num_heads}) and divide or be a multiple of the number of KV heads "
                         f"({config.num_kv_heads})")
    if config.intermediate_size % size:
        raise ValueError(f"tensor parallel size {size} must divide intermediate_size {config.intermediate_size}")


def shard_heads(num_heads: int, num_kv_heads: int, tp: TPGroup) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) of this rank. Query heads split evenly; KV heads too when there
    are at least as many as ranks, else each KV head is replicated on the ranks whose query heads use it."""
    kv_local = max(1, num_kv_heads // tp.size)
    return num_heads // tp.size, kv_local, tp.rank * num_kv_heads // tp.size


def _join(rank: int, size: int, port: int, device: torch.device) -> TPGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A long timeout: a first prefill on a slow CPU is one collective away from the next.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(minutes=30))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return TPGroup(rank, size, cpu_group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(model_path, args, max_model_len: int) -> TPGroup:
    """Rank 0: start ranks 1..N-1 and join them. The worker's CPU threads are shared among its ranks."""
    size = args.tensor_parallel_size
    if dist.is_initialized():
        raise RuntimeError("this process already runs a tensor-parallel group; close it first (LLM.close())")
    if device_count := (torch.cuda.device_count() if args.resolved_device().type == "cuda" else 0):
        if (args.resolved_device().index or 0) + size > device_count:
            raise ValueError(f"tensor parallel size {size} needs {size} GPUs from {args.resolved_device()}; "
                             f"{device_count} visible")
    threads = max(1, torch.get_num_threads() // size)
    torch.set_num_threads(threads)
    port = _free_port()
    device = args.resolved_device()
    # The children import this package the way this process did, wherever it was imported from.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    children = []
    for rank in range(1, size):
        child = subprocess.Popen([sys.executable, "-m", "engine.parallel"], stdin=subprocess.PIPE, env=env)
        rank_args = replace(args, device=str(rank_device(device, rank)))
        child.stdin.write(msgspec.json.encode(RankLaunch(rank, size, port, str(model_path), rank_args, max_model_len,
                                                         threads, logging.getLogger().level)))
        child.stdin.close()
        children.append(child)
    group = _join(0, size, port, device)
    group.children = children
    for rank, child in enumerate(children, 1):
        threading.Thread(target=group._watch, args=(child, rank), daemon=True,
                         name=f"tp-rank{rank}-watch").start()
    atexit.register(group.close)
    return group


def rank_main() -> None:
    """Ranks 1..N-1: load this rank's shard, then run the forward pass of every step rank 0 broadcasts."""
    launch = msgspec.json.decode(sys.stdin.buffer.read(), type=RankLaunch)
    from .worker import detach_from_terminal
    detach_from_terminal(f"halffull-tp{launch.rank}")
    logging.basicConfig(level=launch.log_level, format=f"%(asctime)s tp-rank{launch.rank} %(levelname)s %(message)s")
    torch.set_num_threads(launch.threads)
    from .config import ModelConfig
    from .model_runner import ModelRunner
    args = launch.args
    group = _join(launch.rank, launch.size, launch.port, args.resolved_device())
    ModelRunner(ModelConfig.load(launch.model_path, args.dtype), args, launch.max_model_len, group).follow()
    dist.destroy_process_group()
    logging.shutdown()
    os._exit(0)  # nothing left to finalise; tearing down torch's modules would only delay the worker's exit


if __name__ == "__main__":
    rank_main()
