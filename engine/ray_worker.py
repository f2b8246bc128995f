"""Workers on a Ray cluster (`--data-parallel-backend ray`). Ray is imported only here, and this module only
when that backend is asked for.

The server starts a local process for a Ray worker as for any worker, on the same shared-memory queues, and
that process runs the same `Worker` loop; only its engine is `RemoteEngine`, a stand-in that collects the
loop's messages and runs each step on a `RayEngine` actor somewhere on the cluster: one actor call per step
carries every request and abort that arrived since the previous step and brings back the step's outputs and
the engine's load report. So the server and every balancer policy see a remote worker exactly as a local one.

The actor takes one CPU (or one GPU) per tensor-parallel rank; its ranks are its child processes, so they
share its node. Workers are spread over the nodes. The model directory must exist at the same path on every
node, and halffull be installed there.

A lost actor or node is a dead worker. The proxy learns it from the failed step call, or from the head (its
node no longer alive) when the actor's process outlives its node's raylet for a while: either way it exits
at once, and the server fails all that worker's requests with a 503 and restarts it. The new proxy asks Ray
for a new actor, which Ray places once a node has room (the lost node, when it rejoins); until then the
worker is down and the balancer routes around it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import NoReturn

import ray

from scheduling import SchedulerStats

from .messages import Abort, GenerateRequest, LoadReport, ToWorker, TokenOutput, WorkerReady
from .worker import Worker, WorkerSpec, attach_worker_process, load_engine

log = logging.getLogger(__name__)

NODE_CHECK_S = 0.25  # how often the proxy asks the head whether its actor's node is alive
PLACEMENT_LOG_S = 30.0  # while no node has room for the actor, how often to say so


class RayEngine:
    """The engine inside a Ray actor, driven by its worker's proxy one step per call. Time stamps cross
    between the proxy's monotonic clock and this node's: arrival times are shifted by the difference (the
    call's transit time included), the load report's time shifted back."""

    def __init__(self, spec: WorkerSpec):
        self.engine, self.ready_message = load_engine(spec, node=ray.get_runtime_context().get_node_id())
        self.worker = Worker(spec.worker_id, spec.incarnation, self.engine, None, None, None)

    def ready(self) -> WorkerReady:
        return self.ready_message

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


class RemoteEngine:
    """What the proxy's `Worker` loop drives in place of an EngineCore: requests and aborts wait here for
    the next step, which runs them and the engine's step in one actor call."""

    def __init__(self, actor, ready: WorkerReady):
        self.actor, self.node = actor, ready.node
        self.pending: list[ToWorker] = []
        self.remote_has_work = False
        self.report = LoadReport(ready.worker_id, SchedulerStats(kv_blocks_total=ready.num_kv_blocks))

    def add_request(self, msg: GenerateRequest) -> None:
        self.pending.append(msg)  # refused, it ends from the actor's side with its error, as locally

    def abort(self, request_id: str) -> None:
        self.pending.append(Abort(request_id))  # its "abort" output comes from the actor

    def has_work(self) -> bool:
        return bool(self.pending) or self.remote_has_work

    def step(self) -> list[TokenOutput]:
        msgs, self.pending = self.pending, []
        try:
            outputs, self.report, self.remote_has_work = ray.get(self.actor.step.remote(msgs, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - the actor, its node, or its step failed: the worker is lost
            lost(f"the engine actor on Ray node {self.node} failed: {type(e).__name__}: {e}")
        return outputs

    def load_report(self) -> LoadReport:
        return self.report


def lost(why: str) -> NoReturn:
    """The worker is lost: exit now, so that the server fails its requests and restarts it. Not through
    Python's exit: disconnecting from the cluster first can take seconds."""
    log.error("%s; the worker exits", why)
    logging.shutdown()
    os._exit(1)


def watch_node(node: str) -> None:
    """Exit once the head no longer counts `node` alive. A node whose raylet died can leave the actor's
    process running, and answering, for a while: its requests must fail now, not whenever it notices."""
    while True:
        time.sleep(NODE_CHECK_S)
        try:
            alive = any(n["NodeID"] == node and n["Alive"] for n in ray.nodes())
        except Exception as e:  # noqa: BLE001 - the head is slow or gone: the actor call tells which
            log.warning("could not ask the Ray head about node %s: %s: %s", node, type(e).__name__, e)
            continue
        if not alive:
            lost(f"Ray node {node}, where this worker's engine ran, is dead")


def ray_worker_main(spec: WorkerSpec, ray_address: str) -> None:
    inq, outq, reportq = attach_worker_process(spec)
    ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
    ranks = spec.engine_args.tensor_parallel_size
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    # Ray numbers an actor's GPUs from 0. On CPU, one intra-op thread per rank, on the CPU it holds per rank.
    if gpu:
        resources, device, threads = dict(num_gpus=ranks, num_cpus=0), "cuda:0", spec.threads
    else:
        resources, device, threads = dict(num_cpus=ranks), "cpu", 1
    remote_spec = dataclasses.replace(spec, threads=threads, inbox=None, outbox=None, reports=None,  # queues stay here
                                      engine_args=dataclasses.replace(spec.engine_args, device=device))
    actor = ray.remote(RayEngine).options(scheduling_strategy="SPREAD", max_restarts=0, **resources).remote(
        remote_spec)
    pending = actor.ready.remote()
    while not ray.wait([pending], timeout=PLACEMENT_LOG_S)[0]:
        log.warning("waiting for a Ray node with %s free for this worker's engine", resources)
    try:
        ready = ray.get(pending)
    except Exception as e:  # noqa: BLE001 - reported to the server, which fails the start or retries
        ready = WorkerReady(worker_id=spec.worker_id, incarnation=spec.incarnation, model=spec.model_path,
                            error=f"the engine actor did not start: {type(e).__name__}: {e}")
    outq.put(ready)
    if ready.error is not None:
        return
    log.info("engine actor on Ray node %s", ready.node)
    threading.Thread(target=watch_node, args=(ready.node,), daemon=True).start()
    Worker(spec.worker_id, spec.incarnation, RemoteEngine(actor, ready), inq, outq, reportq).run()
    ray.kill(actor)  # shut down: the server waits for this process, not for the actor
