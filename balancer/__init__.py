"""Routing: which worker gets a request. One module per policy under balancer/policies/."""

from . import policies
from .policy import BALANCERS, BalancerPolicy, Knobs, WorkerLoad, register

BALANCERS.load(policies)  # every module of balancer/policies registers itself


def make_balancer(name: str, knobs=None, seed: int = 0) -> BalancerPolicy:
    """`knobs`: the policy's Knobs, or a dict of overrides of its defaults."""
    cls, knobs = BALANCERS.lookup(name, knobs)
    return cls(knobs, seed)


__all__ = ["BALANCERS", "BalancerPolicy", "Knobs", "WorkerLoad", "register", "make_balancer"]
