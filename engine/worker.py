"""The worker process: one engine on one device, fed by the balancer, answering the server.

Loop: take every message waiting (new requests, aborts), run one step if there is work, send that
step's outputs to the server in one message and a load report to the balancer. With no work, block
on the input queue. A request the engine refuses ends at once with its error; it never stops the loop.
"""

from __future__ import annotations

import logging
import os
import queue
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ipc import QueueSpec, ShmQueue
from .messages import (Abort, FromWorker, GenerateRequest, LoadReport, Shutdown, StepOutputs, ToWorker,
                       TokenOutput, WorkerFailed, WorkerReady)

if TYPE_CHECKING:  # importing them would import torch into the balancer, which imports this module
    from .config import EngineArgs
    from .engine_core import EngineCore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process starts from (handed to the spawned child)."""
    worker_id: int
    incarnation: int  # which start of this worker: messages from an earlier one are stale
    model_path: str
    engine_args: EngineArgs
    threads: int  # torch intra-op threads
    inbox: QueueSpec  # ToWorker, from the balancer
    outbox: QueueSpec  # FromWorker, to the server
    reports: QueueSpec  # LoadReport, to the balancer
    log_level: int = logging.INFO


def attach_worker_process(spec: WorkerSpec) -> tuple[ShmQueue, ShmQueue, ShmQueue]:
    """A worker process's start, local or Ray proxy: detached from the terminal, logging as its worker,
    attached to its queues (in, out, load reports)."""
    detach_from_terminal(f"halffull-w{spec.worker_id}")
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s worker{spec.worker_id} %(levelname)s %(message)s")
    return (ShmQueue.attach(spec.inbox, ToWorker), ShmQueue.attach(spec.outbox, FromWorker),
            ShmQueue.attach(spec.reports, LoadReport))


def worker_main(spec: WorkerSpec) -> None:
    inq, outq, reportq = attach_worker_process(spec)
    engine, ready = load_engine(spec)
    outq.put(ready)
    if engine is not None:
        Worker(spec.worker_id, spec.incarnation, engine, inq, outq, reportq).run()


def load_engine(spec: WorkerSpec, node: str = "local") -> tuple[EngineCore | None, WorkerReady]:
    """The worker's engine on its device, and the WorkerReady that announces it (or says why it could not
    start: then no engine). `node`: where it runs, for /metrics (a Ray node id, engine/ray_worker.py)."""
    import torch
    torch.set_num_threads(spec.threads)
    device = spec.engine_args.resolved_device()
    if device.type == "cuda":
        # This worker's GPU becomes the process's current device: Triton launches on the current
        # device's stream and CUDA-graph capture uses it, so workers on cuda:1+ need it set.
        torch.cuda.set_device(device)
    from . import parallel
    from .engine_core import EngineCore
    parallel.EXIT_ON_RANK_DEATH = True
    which = dict(worker_id=spec.worker_id, incarnation=spec.incarnation, model=spec.model_path, node=node)
    try:
        engine = EngineCore(spec.model_path, spec.engine_args, spec.worker_id)
    except Exception as e:  # noqa: BLE001 - reported to the server, which exits with it
        return None, WorkerReady(**which, error=f"{type(e).__name__}: {e}")
    return engine, WorkerReady(**which, num_kv_blocks=engine.kv.num_blocks, block_size=engine.kv.block_size,
                               max_model_len=engine.max_model_len, device=str(engine.runner.device),
                               attention_backend=engine.runner.backend.name)


class Worker:
    def __init__(self, worker_id, incarnation, engine, inq, outq, reportq):
        self.worker_id, self.incarnation = worker_id, incarnation
        self.engine, self.inq, self.outq, self.reportq = engine, inq, outq, reportq

    def report(self) -> None:
        r: LoadReport = self.engine.load_report()
        r.incarnation = self.incarnation
        try:  # a report is superseded by the next one, so a full queue just skips it
            self.reportq.put(r, timeout=0)
        except queue.Full:
            pass

    def handle(self, msg, outputs: list[TokenOutput]) -> bool:
        """Apply one message; False on shutdown."""
        if isinstance(msg, GenerateRequest):
            try:
                self.engine.add_request(msg)
            except ValueError as e:
                outputs.append(TokenOutput(msg.request_id, [], finish_reason="error", error=str(e), status=400))
        elif isinstance(msg, Abort):
            out = self.engine.abort(msg.request_id)
            if out is not None:
                outputs.append(out)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def run(self) -> None:
        running = True
        while running:
            outputs: list[TokenOutput] = []
            msgs = self.inq.drain() if self.engine.has_work() else [self.inq.get(timeout=None)] + self.inq.drain()
            for msg in msgs:
                running = self.handle(msg, outputs) and running
            if running and self.engine.has_work():
                try:
                    outputs += self.engine.step()
                except Exception:  # noqa: BLE001 - a failed step loses its batch, not the worker's peers
                    self.fail(traceback.format_exc())
                    raise
            if outputs:
                self.outq.put(StepOutputs(self.worker_id, outputs))
            self.report()

    def fail(self, error: str) -> None:
        log.error("step failed:\n%s", error)
        self.outq.put(WorkerFailed(self.worker_id, error.strip().splitlines()[-1]))


def cpu_threads_per_worker(num_workers: int) -> int:
    """The most intra-op threads a worker computes on: its share of the cores. Steps too small to gain
    from the last one leave it to the server (ModelRunner.step_threads)."""
    return max(1, (os.cpu_count() or 1) // max(num_workers, 1))


def detach_from_terminal(name: str) -> None:
    """Children leave SIGINT/SIGTERM to the server (which stops them in order, also when the whole
    process group is signalled) and die with it if it is killed outright: no orphan outlives it.
    `name` becomes the process name that ps and top show (at most 15 bytes)."""
    import ctypes
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, name.encode()[:15])  # PR_SET_NAME
    except OSError:
        pass
