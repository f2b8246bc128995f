"""The server's side of the process shape: it starts the balancer and the workers, owns every
shared-memory queue, streams each request's outputs back to its HTTP handler, and restarts a
worker that dies (its requests fail at once; the balancer routes around it meanwhile) or a balancer
that dies (on the same queues: requests already routed never notice)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field

from balancer.process import BalancerSpec, balancer_main
from engine.ipc import ShmQueue, remove_orphaned_segments
from engine.messages import (Abort, FromBalancer, FromWorker, GenerateRequest, LoadReport, Routed, RouteFailed,
                             SamplingParams, Shutdown, SLO, StepOutputs, ToBalancer, ToWorker, TokenOutput,
                             WorkerDown, WorkerFailed, WorkerReady, WorkerUp)
from engine.worker import WorkerSpec, cpu_threads_per_worker, worker_main
from scheduling import SchedulerStats

log = logging.getLogger("server")

QUEUE_BYTES = 8 << 20


def crash_loop_delay_s(restarts: int) -> float:
    """How long to wait before restarting a process that keeps dying: 0.5 s, doubling per restart, at most 30 s."""
    return min(0.5 * 2 ** restarts, 30.0)


@dataclass
class RequestState:
    request_id: str
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    worker_id: int = -1
    abort_pending: bool = False
    finished: bool = False
    first_output_time: float | None = None


@dataclass
class WorkerSlot:
    worker_id: int
    to_worker: ShmQueue
    from_worker: ShmQueue
    reports: ShmQueue
    process: mp.Process | None = None
    incarnation: int = 0
    ready: WorkerReady | None = None
    alive: bool = False
    restarts: int = 0
    node: str = "local"  # the node the worker runs on, as /metrics labels it
    on_ray: bool = False  # an engine actor on a Ray cluster, behind a local proxy process


class EngineClient:
    def __init__(self, model_path: str, engine_args, devices: list[str], balancer: str, balancer_knobs: dict,
                 seed: int = 0, log_level: int = logging.INFO, ray_workers: int = 0, ray_address: str | None = None):
        """One worker per entry of `devices` ("cuda:0", "cpu", ...), on this machine; then `ray_workers`
        more on the Ray cluster at `ray_address` (engine/ray_worker.py)."""
        num_workers = len(devices) + ray_workers
        self.devices = devices
        self.ray_address = ray_address
        self.model_path, self.engine_args, self.log_level = model_path, engine_args, log_level
        self.ctx = mp.get_context("spawn")
        orphaned = remove_orphaned_segments()
        if orphaned:
            log.info("removed %d shared-memory segments left by a server that was killed", len(orphaned))
        self.to_balancer = ShmQueue.create(QUEUE_BYTES, ToBalancer)
        self.from_balancer = ShmQueue.create(QUEUE_BYTES, FromBalancer)
        self.workers = [WorkerSlot(i, ShmQueue.create(QUEUE_BYTES, ToWorker), ShmQueue.create(QUEUE_BYTES, FromWorker),
                                   ShmQueue.create(1 << 20, LoadReport), on_ray=i >= len(devices))
                        for i in range(num_workers)]
        self.balancer_spec = BalancerSpec(balancer, balancer_knobs, seed, self.to_balancer.spec,
                                          self.from_balancer.spec, [w.to_worker.spec for w in self.workers],
                                          [w.reports.spec for w in self.workers], log_level)
        self.balancer_proc: mp.Process | None = None
        self.balancer_started = 0.0
        self.balancer_restarts = 0
        self.requests: dict[str, RequestState] = {}
        self.reports: dict[int, LoadReport] = {}
        self.ids = itertools.count()
        self.tasks: list[asyncio.Task] = []
        self.closing = False
        self.drain_deadline: float | None = None  # set once shutdown began: when in-flight requests are failed
        self.down_acks: dict[int, asyncio.Future] = {}
        self.threads = cpu_threads_per_worker(len(devices))

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> list[WorkerReady]:
        """Start balancer and workers; return once every worker has loaded the model."""
        self._spawn_balancer()
        for w in self.workers:
            self._spawn(w)
        ready = await asyncio.gather(*(self._await_ready(w) for w in self.workers))
        errors = [r.error for r in ready if r.error]
        if errors:
            await self.shutdown(0.0)
            raise RuntimeError(f"worker failed to start: {errors[0]}")
        loop = asyncio.get_running_loop()
        self.tasks.append(asyncio.ensure_future(self._read_balancer()))
        for w in self.workers:
            self.tasks.append(asyncio.ensure_future(self._read_worker(w)))
        loop.add_reader(self.balancer_proc.sentinel, self._balancer_died)
        return ready

    def _spawn_balancer(self) -> None:
        self.balancer_proc = self.ctx.Process(target=balancer_main, name="halffull-balancer", daemon=True,
                                              args=(self.balancer_spec,))
        self.balancer_proc.start()
        self.balancer_started = time.monotonic()

    def _spawn(self, w: WorkerSlot) -> None:
        w.incarnation += 1
        # A Ray worker's actor finds its device on its node.
        engine_args = self.engine_args if w.on_ray else dataclasses.replace(self.engine_args,
                                                                            device=self.devices[w.worker_id])
        spec = WorkerSpec(worker_id=w.worker_id, incarnation=w.incarnation, model_path=str(self.model_path),
                          engine_args=engine_args, threads=self.threads, inbox=w.to_worker.spec,
                          outbox=w.from_worker.spec, reports=w.reports.spec, log_level=self.log_level)
        if w.on_ray:
            from engine.ray_worker import ray_worker_main
            target, args = ray_worker_main, (spec, self.ray_address)
        else:
            target, args = worker_main, (spec,)
        w.process = self.ctx.Process(target=target, name=f"halffull-worker{w.worker_id}", daemon=True, args=args)
        w.process.start()

    async def _await_ready(self, w: WorkerSlot) -> WorkerReady:
        """The worker's WorkerReady; a worker that dies before sending it fails the start."""
        loop = asyncio.get_running_loop()
        died = loop.create_future()
        loop.add_reader(w.process.sentinel, lambda: died.done() or died.set_result(None))
        try:
            while True:
                get = asyncio.ensure_future(w.from_worker.get_async())
                await asyncio.wait([get, died], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return WorkerReady(worker_id=w.worker_id, incarnation=w.incarnation, model=str(self.model_path),
                                       error=f"worker {w.worker_id} exited with code {w.process.exitcode} "
                                             "before it was ready (see its log above)")
                msg = get.result()
                if isinstance(msg, WorkerReady) and msg.incarnation == w.incarnation:
                    self._ready(w, msg)
                    return msg
        finally:
            loop.remove_reader(w.process.sentinel)
            if w.alive:
                loop.add_reader(w.process.sentinel, self._worker_died, w)

    def _ready(self, w: WorkerSlot, ready: WorkerReady) -> None:
        w.ready, w.alive, w.node = ready, ready.error is None, ready.node
        if w.alive:  # until its first load report (it sends none while idle), /metrics shows an empty worker
            self.reports[w.worker_id] = LoadReport(w.worker_id, SchedulerStats(kv_blocks_total=ready.num_kv_blocks),
                                                   incarnation=ready.incarnation)

    @property
    def healthy(self) -> bool:
        return (all(w.alive for w in self.workers) and self.balancer_proc is not None
                and self.balancer_proc.is_alive())

    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def stop_accepting(self, grace_s: float) -> None:
        """Shutdown begins (SIGTERM): new requests are refused; those in flight may finish within `grace_s`
        and then end with a clean error, while their connections are still open to carry it."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + grace_s
            asyncio.get_running_loop().call_later(grace_s, self._fail_all, "the server is shutting down")

    def _fail_all(self, error: str) -> None:
        for state in list(self.requests.values()):
            self._fail(state, error, "abort")

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Let in-flight requests finish within the grace period, fail the rest, stop the children."""
        self.stop_accepting(grace_s)
        while self.requests and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(0.05)
        self._fail_all("the server is shutting down")
        self.closing = True
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.process is not None:
                loop.remove_reader(w.process.sentinel)
        if self.balancer_proc is not None:
            loop.remove_reader(self.balancer_proc.sentinel)
            if self.balancer_proc.is_alive():
                try:
                    await asyncio.wait_for(self.to_balancer.put_async(Shutdown()), 1.0)
                except asyncio.TimeoutError:
                    pass
        for t in self.tasks:
            t.cancel()
        procs = [p for p in [self.balancer_proc] + [w.process for w in self.workers] if p is not None]
        for p in procs:
            await asyncio.to_thread(p.join, 5.0)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5.0)
        for q in [self.to_balancer, self.from_balancer] + [q for w in self.workers
                                                          for q in (w.to_worker, w.from_worker, w.reports)]:
            q.close()
            q.unlink()

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, priority: int = 0,
                     slo: SLO = SLO(), id_prefix: str = "req") -> RequestState:
        request_id = f"{id_prefix}-{next(self.ids)}"  # unique in this server even where prefixes repeat
        state = RequestState(request_id)
        self.requests[request_id] = state
        try:
            await self.to_balancer.put_async(GenerateRequest(request_id, prompt_token_ids, sampling,
                                                             time.monotonic(), priority, slo))
        except BaseException:  # not sent (cancelled while the queue was full, or not encodable)
            del self.requests[request_id]
            raise
        return state

    async def abort(self, state: RequestState) -> None:
        """Stop a request (client gone, stop string found); its worker frees its KV."""
        if state.finished:
            return
        state.finished = True
        self.requests.pop(state.request_id, None)
        if state.worker_id >= 0:
            await self.to_balancer.put_async(Abort(state.request_id, state.worker_id))
        else:
            state.abort_pending = True  # sent once the balancer says where it went
            self.requests[state.request_id] = state

    def _deliver(self, out: TokenOutput) -> None:
        state = self.requests.get(out.request_id)
        if state is None or (state.finished and not state.abort_pending):
            return
        if out.finish_reason is not None:
            self.requests.pop(out.request_id, None)
            state.finished = True
        if state.first_output_time is None:
            state.first_output_time = time.monotonic()
        if not state.abort_pending:
            state.outputs.put_nowait(out)

    def _fail(self, state: RequestState, error: str, reason: str = "error") -> None:
        self._deliver(TokenOutput(state.request_id, [], finish_reason=reason, error=error, status=503))

    # ---- queue readers ----------------------------------------------------------------------------
    async def _read_worker(self, w: WorkerSlot) -> None:
        while True:
            for msg in await w.from_worker.get_many_async():
                if isinstance(msg, StepOutputs):
                    for out in msg.outputs:
                        self._deliver(out)
                elif isinstance(msg, WorkerReady) and msg.incarnation == w.incarnation:
                    await self._worker_back(w, msg)
                elif isinstance(msg, WorkerFailed):
                    log.error("worker %d failed: %s", w.worker_id, msg.error)

    async def _read_balancer(self) -> None:
        while True:
            for msg in await self.from_balancer.get_many_async():
                if isinstance(msg, Routed):
                    state = self.requests.get(msg.request_id)
                    if state is None:  # over already (finished first, or failed as a balancer died): stop it
                        await self.to_balancer.put_async(Abort(msg.request_id, msg.worker_id))
                        continue
                    state.worker_id = msg.worker_id
                    if not self.workers[msg.worker_id].alive:
                        self._fail(state, f"engine worker {msg.worker_id} died")
                    elif state.abort_pending:
                        self.requests.pop(state.request_id, None)
                        await self.to_balancer.put_async(Abort(state.request_id, state.worker_id))
                elif isinstance(msg, RouteFailed):
                    if (state := self.requests.get(msg.request_id)) is not None:
                        self._fail(state, msg.error)
                elif isinstance(msg, LoadReport):
                    self.reports[msg.worker_id] = msg
                elif isinstance(msg, WorkerDown):
                    fut = self.down_acks.pop(msg.worker_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    # ---- failures ---------------------------------------------------------------------------------
    def _worker_died(self, w: WorkerSlot) -> None:
        asyncio.get_running_loop().remove_reader(w.process.sentinel)
        if self.closing:
            return
        was_serving, w.alive = w.alive, False
        log.error("worker %d (pid %d) died; restarting it", w.worker_id, w.process.pid)
        self.reports.pop(w.worker_id, None)
        self.tasks.append(asyncio.ensure_future(self._restart(w, was_serving)))

    def _fail_worker_requests(self, w: WorkerSlot) -> None:
        for state in [s for s in self.requests.values() if s.worker_id == w.worker_id]:
            self._fail(state, f"engine worker {w.worker_id} died while serving this request")

    async def _restart(self, w: WorkerSlot, was_serving: bool) -> None:
        if was_serving:
            self._fail_worker_requests(w)
            # Once the balancer acknowledges, nothing more is on its way to the dead worker's queue.
            ack = self.down_acks[w.worker_id] = asyncio.get_running_loop().create_future()
            await self.to_balancer.put_async(WorkerDown(w.worker_id))
            await ack
            self._fail_worker_requests(w)  # those routed to it before the balancer knew
            w.to_worker.drain()  # their messages; the new worker must not run them
        else:  # it died again before it was ready: back off
            await asyncio.sleep(crash_loop_delay_s(w.restarts))
        w.restarts += 1
        await asyncio.to_thread(w.process.join, 1.0)  # reap it: its fds close a moment before it can be
        log.info("worker %d had exit code %s", w.worker_id, w.process.exitcode)
        self._spawn(w)
        asyncio.get_running_loop().add_reader(w.process.sentinel, self._worker_died, w)

    async def _worker_back(self, w: WorkerSlot, ready: WorkerReady) -> None:
        if ready.error:
            log.error("worker %d could not restart: %s", w.worker_id, ready.error)
            return
        self._ready(w, ready)
        await self.to_balancer.put_async(WorkerUp(w.worker_id, w.incarnation))
        log.info("worker %d is back (restart %d)", w.worker_id, w.restarts)

    def _balancer_died(self) -> None:
        """Start a new balancer on the same queues. Requests already routed never notice: their outputs come
        straight from the workers. What the dead one had taken from its inbox but not routed is lost, so
        the requests not routed yet fail, except those still unread in its inbox: those go to the new one."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.balancer_proc.sentinel)
        if self.closing:
            return
        unread = self.to_balancer.drain()  # safe: its only consumer is dead
        queued = {m.request_id for m in unread if isinstance(m, GenerateRequest)}
        for state in [s for s in self.requests.values() if s.worker_id < 0 and s.request_id not in queued]:
            self._fail(state, "the balancer process died before routing this request")
        # The new balancer assumes every worker is up: tell it which are not (this also answers a WorkerDown
        # the dead one never acknowledged).
        for msg in unread + [WorkerDown(w.worker_id) for w in self.workers if not w.alive]:
            self.to_balancer.put(msg, timeout=0)
        self.balancer_restarts += 1
        self.tasks.append(asyncio.ensure_future(self._restart_balancer()))

    async def _restart_balancer(self) -> None:
        dead = self.balancer_proc
        await asyncio.to_thread(dead.join, 1.0)  # reap it: its fds close a moment before it can be
        log.error("the balancer process (pid %d) died with exit code %s; restarting it", dead.pid, dead.exitcode)
        if time.monotonic() - self.balancer_started < 10.0:  # it died soon after its start: back off
            await asyncio.sleep(crash_loop_delay_s(self.balancer_restarts))
        if self.closing:
            return
        self._spawn_balancer()
        asyncio.get_running_loop().add_reader(self.balancer_proc.sentinel, self._balancer_died)
        log.info("balancer restarted (restart %d)", self.balancer_restarts)
