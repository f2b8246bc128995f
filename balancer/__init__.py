"""Routing: which worker gets a request. One module per policy under balancer/policies/."""

import importlib
import pkgutil

from . import policies
from .policy import BALANCERS, BalancerPolicy, Knobs, WorkerLoad, register

for _module in pkgutil.iter_modules(policies.__path__):
    importlib.import_module(f"{policies.__name__}.{_module.name}")


def make_balancer(name: str, knobs=None, seed: int = 0) -> BalancerPolicy:
    """`knobs`: the policy's Knobs, or a dict of overrides of its defaults."""
    try:
        cls = BALANCERS[name]
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; choose from {', '.join(sorted(BALANCERS))}") from None
    if isinstance(knobs, dict):
        knobs = cls.Knobs(**knobs)
    return cls(knobs, seed)


__all__ = ["BALANCERS", "BalancerPolicy", "Knobs", "WorkerLoad", "register", "make_balancer"]
