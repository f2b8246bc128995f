"""The balancer process: routes each request from the server to one worker by the chosen policy,
forwards aborts to the owning worker, and keeps every worker's load current from its reports."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from engine.ipc import QueueSpec, ShmQueue
from engine.worker import detach_from_terminal
from engine.messages import (Abort, FromBalancer, GenerateRequest, LoadReport, Routed, RouteFailed, Shutdown,
                             ToBalancer, ToWorker, WorkerDown, WorkerUp)

from . import make_balancer
from .policy import BalancerPolicy, WorkerLoad

log = logging.getLogger(__name__)

FORWARD_INTERVAL_S = 0.1


class Balancer:
    def __init__(self, policy: BalancerPolicy, inbox: ShmQueue, outbox: ShmQueue,
                 to_workers: list[ShmQueue], reports: list[ShmQueue]):
        self.policy = policy
        self.inbox, self.outbox = inbox, outbox
        self.to_workers, self.reports = to_workers, reports
        self.workers = [WorkerLoad(i) for i in range(len(to_workers))]
        self.incarnation = [0] * len(to_workers)
        self.forwarded = [float("-inf")] * len(to_workers)  # time of the last report sent to the server

    async def route(self, request: GenerateRequest) -> None:
        live = [w for w in self.workers if w.alive]
        if not live:
            await self.outbox.put_async(RouteFailed(request.request_id, "no engine worker is available"))
            return
        worker = self.workers[self.policy.choose(request, live)]
        worker.record_sent(request)
        await self.to_workers[worker.worker_id].put_async(request)
        await self.outbox.put_async(Routed(request.request_id, worker.worker_id))

    async def serve_server(self) -> None:
        while True:
            for msg in await self.inbox.get_many_async():
                if isinstance(msg, GenerateRequest):
                    await self.route(msg)
                elif isinstance(msg, Abort):
                    if self.workers[msg.worker_id].alive:
                        await self.to_workers[msg.worker_id].put_async(msg)
                elif isinstance(msg, WorkerDown):
                    self.workers[msg.worker_id].alive = False
                    await self.outbox.put_async(msg)  # acknowledges: nothing more goes to it
                elif isinstance(msg, WorkerUp):
                    w = self.workers[msg.worker_id]
                    w.reset()
                    w.alive = True
                    self.incarnation[msg.worker_id] = msg.incarnation
                elif isinstance(msg, Shutdown):
                    for i, q in enumerate(self.to_workers):
                        if self.workers[i].alive:
                            await q.put_async(msg)
                    return

    async def serve_reports(self, worker_id: int) -> None:
        q = self.reports[worker_id]
        while True:
            batch = await q.get_many_async()
            fresh = [r for r in batch if r.incarnation >= self.incarnation[worker_id]]
            if not fresh or not self.workers[worker_id].alive:
                continue
            for r in fresh:
                self.policy.on_report(r)
            latest = fresh[-1]
            self.workers[worker_id].record_report(latest)
            # The server only exports reports on /metrics: a few a second do, and an idle worker's
            # last one always goes, so the gauges settle at the true final state.
            idle = latest.stats.num_running == 0 and latest.stats.num_waiting == 0
            if idle or latest.time - self.forwarded[worker_id] >= FORWARD_INTERVAL_S:
                self.forwarded[worker_id] = latest.time
                await self.outbox.put_async(latest)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self.serve_reports(i)) for i in range(len(self.reports))]
        try:
            await self.serve_server()
        finally:
            for t in tasks:
                t.cancel()


@dataclass(frozen=True)
class BalancerSpec:
    """Everything the balancer process starts from (handed to the spawned child)."""
    policy: str
    knobs: dict
    seed: int
    inbox: QueueSpec  # ToBalancer, from the server
    outbox: QueueSpec  # FromBalancer, to the server
    to_workers: list[QueueSpec]  # ToWorker, one per worker
    reports: list[QueueSpec]  # LoadReport, one per worker
    log_level: int = logging.INFO


def balancer_main(spec: BalancerSpec) -> None:
    detach_from_terminal("halffull-bal")
    logging.basicConfig(level=spec.log_level, format="%(asctime)s balancer %(levelname)s %(message)s")
    import uvloop
    balancer = Balancer(make_balancer(spec.policy, spec.knobs, spec.seed), ShmQueue.attach(spec.inbox, ToBalancer),
                        ShmQueue.attach(spec.outbox, FromBalancer),
                        [ShmQueue.attach(s, ToWorker) for s in spec.to_workers],
                        [ShmQueue.attach(s, LoadReport) for s in spec.reports])
    uvloop.run(balancer.run())
