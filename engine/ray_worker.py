"""Workers on other nodes through Ray (`--data-parallel-backend ray`); Ray is imported only here.

The server still starts one local process per worker and talks to it through the same shared-memory
queues, so the balancer and the server see a remote worker exactly as a local one, load reports included.
For a Ray worker that process is a proxy: it places a `RayEngine` actor on the cluster (one CPU, or one GPU
per tensor-parallel rank; spread over the nodes) and drives the actor's step loop with one call per step,
which carries every message that arrived since the previous step and returns the step's outputs and load
report. If the actor or its node dies the call fails, the proxy exits, and the server handles it as any dead
worker: its requests fail with a 503 and the proxy is restarted, placing a new actor wherever the cluster has
room (on the lost node once it is back).
"""

from __future__ import annotations

import logging
import os
import queue
import time

from .ipc import QueueSpec, ShmQueue
from .messages import (FromWorker, GenerateRequest, LoadReport, Shutdown, StepOutputs, ToWorker, TokenOutput,
                       WorkerFailed, WorkerReady)
from .worker import Worker, detach_from_terminal

log = logging.getLogger(__name__)


class RayEngine:
    """The engine inside a Ray actor. `now` arguments are the proxy's monotonic clock: requests' arrival
    times are shifted by the clock difference (the call's transit time included) onto this node's clock."""

    def __init__(self, worker_id: int, model_path: str, engine_args, threads: int):
        import torch
        torch.set_num_threads(threads)
        from . import parallel
        from .engine_core import EngineCore
        parallel.EXIT_ON_RANK_DEATH = True  # a dead rank kills the actor: the proxy sees it die
        self.engine = EngineCore(model_path, engine_args, worker_id)
        self.worker = Worker(worker_id, 0, self.engine, None, None, None)

    def ready(self) -> tuple:
        import ray
        r = self.engine.runner
        return (self.engine.kv.num_blocks, self.engine.max_model_len, str(r.device), r.backend.name,
                ray.get_runtime_context().get_node_id())

    def step(self, msgs: list[ToWorker], now: float) -> tuple[list[TokenOutput], LoadReport, bool]:
        skew = time.monotonic() - now
        outputs: list[TokenOutput] = []
        for msg in msgs:
            if isinstance(msg, GenerateRequest):
                msg.arrival_time += skew
            self.worker.handle(msg, outputs)
        if self.engine.has_work():
            outputs += self.engine.step()
        report = self.engine.load_report()
        report.time -= skew
        return outputs, report, self.engine.has_work()


def ray_worker_main(worker_id: int, incarnation: int, model_path: str, engine_args, threads: int,
                    inbox: QueueSpec, outbox: QueueSpec, reports: QueueSpec, log_level: int, ray_address: str) -> None:
    detach_from_terminal(f"halffull-w{worker_id}")
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker{worker_id} %(levelname)s %(message)s")
    import ray
    inq = ShmQueue.attach(inbox, ToWorker)
    outq = ShmQueue.attach(outbox, FromWorker)
    reportq = ShmQueue.attach(reports, LoadReport)
    ray.init(address=ray_address, logging_level=log_level, log_to_driver=False)
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(num_gpus=engine_args.tensor_parallel_size, num_cpus=0) if gpu else dict(num_cpus=1)
    actor = ray.remote(RayEngine).options(scheduling_strategy="SPREAD", max_restarts=0, **resources).remote(
        worker_id, model_path, engine_args, 1 if not gpu else threads)
    try:
        blocks, max_len, device, backend, node = ray.get(actor.ready.remote())
    except Exception as e:  # noqa: BLE001 - reported to the server, which fails the start or retries
        outq.put(WorkerReady(worker_id, incarnation, 0, 0, 0, "", "", model_path, error=f"{type(e).__name__}: {e}"))
        return
    log.info("engine actor on Ray node %s", node)
    outq.put(WorkerReady(worker_id, incarnation, blocks, engine_args.block_size, max_len, device, backend,
                         model_path, node=node))
    has_work = False
    while True:
        msgs = inq.drain() if has_work else [inq.get(timeout=None)] + inq.drain()
        if any(isinstance(m, Shutdown) for m in msgs):
            ray.kill(actor)
            return
        try:
            outputs, report, has_work = ray.get(actor.step.remote(msgs, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - the actor or its node is gone: die as a worker dies
            log.error("engine actor on node %s failed: %s", node, e)
            outq.put(WorkerFailed(worker_id, f"Ray actor on node {node} failed: {type(e).__name__}"))
            logging.shutdown()
            os._exit(1)  # at once: disconnecting from the cluster first could take seconds
        if outputs:
            outq.put(StepOutputs(worker_id, outputs))
        report.incarnation = incarnation
        try:  # a report is superseded by the next one, so a full queue just skips it
            reportq.put(report, timeout=0)
        except queue.Full:
            pass
