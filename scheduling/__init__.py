"""Pure-Python scheduling: request state, the KV block manager, the Scheduler interface and one
module per policy under scheduling/policies/ (each registers itself by name)."""

import importlib
import pkgutil

from . import policies
from .kv_cache import KVBlockManager
from .request import Request, Status
from .scheduler import SCHEDULERS, Chunk, Knobs, Scheduler, SchedulerConfig, SchedulerStats, StepPlan

# Importing every module of scheduling/policies registers it: adding a policy touches nothing else.
for _module in pkgutil.iter_modules(policies.__path__):
    importlib.import_module(f"{policies.__name__}.{_module.name}")


def make_scheduler(name: str, config: SchedulerConfig, kv: KVBlockManager, knobs=None) -> Scheduler:
    """`knobs`: the policy's Knobs, or a dict of overrides of its defaults."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(sorted(SCHEDULERS))}") from None
    if isinstance(knobs, dict):
        knobs = cls.Knobs(**knobs)
    return cls(config, kv, knobs)


__all__ = ["KVBlockManager", "Request", "Status", "SCHEDULERS", "Chunk", "Knobs", "Scheduler",
           "SchedulerConfig", "SchedulerStats", "StepPlan", "make_scheduler"]
