"""The baseline routing policies: round-robin, random, least in-flight, power of two choices."""

from __future__ import annotations

from ..policy import BalancerPolicy, WorkerLoad, register


@register("round-robin")
class RoundRobin(BalancerPolicy):
    def __init__(self, knobs=None, seed: int = 0):
        super().__init__(knobs, seed)
        self.next = 0

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        # Cycle over worker ids, skipping dead ones, so a restart does not reshuffle the order.
        ids = sorted(w.worker_id for w in workers)
        chosen = next((i for i in ids if i >= self.next), ids[0])
        self.next = chosen + 1
        return chosen


@register("random")
class Random(BalancerPolicy):
    def choose(self, request, workers: list[WorkerLoad]) -> int:
        return self.rng.choice(workers).worker_id


@register("least-loaded")
class LeastLoaded(BalancerPolicy):
    """Fewest requests in flight; ties go to the lowest id."""

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        return min(workers, key=lambda w: (w.in_flight, w.worker_id)).worker_id


@register("power-of-two")
class PowerOfTwo(BalancerPolicy):
    """Sample two workers at random, take the one with fewer requests in flight."""

    def choose(self, request, workers: list[WorkerLoad]) -> int:
        if len(workers) == 1:
            return workers[0].worker_id
        a, b = self.rng.sample(workers, 2)
        return min((a, b), key=lambda w: (w.in_flight, w.worker_id)).worker_id
