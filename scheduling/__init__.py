"""Pure-Python scheduling: request state, the KV block manager, the Scheduler interface and one
module per policy under scheduling/policies/ (each registers itself by name)."""

from . import policies
from .kv_cache import KVBlockManager
from .request import Request, Status
from .scheduler import SCHEDULERS, Chunk, Knobs, Scheduler, SchedulerConfig, SchedulerStats, StepPlan

SCHEDULERS.load(policies)  # every module of scheduling/policies registers itself


def make_scheduler(name: str, config: SchedulerConfig, kv: KVBlockManager, knobs=None) -> Scheduler:
    """`knobs`: the policy's Knobs, or a dict of overrides of its defaults."""
    cls, knobs = SCHEDULERS.lookup(name, knobs)
    return cls(config, kv, knobs)


__all__ = ["KVBlockManager", "Request", "Status", "SCHEDULERS", "Chunk", "Knobs", "Scheduler",
           "SchedulerConfig", "SchedulerStats", "StepPlan", "make_scheduler"]
