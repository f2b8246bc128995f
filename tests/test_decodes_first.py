"""The scheduler hands the model runner every plan decodes first (chunks of one new token, then the
rest), whatever order a policy built it in: the runner passes decodes to attention as one batch and
no longer re-sorts. Breaking it (dropping `put_decodes_first` from Scheduler.__init_subclass__) fails
both tests."""

from __future__ import annotations

import random

import pytest

from scheduling import SCHEDULERS, KVBlockManager, Request, SchedulerConfig, StepPlan, make_scheduler
from scheduling.policies.fcfs import FCFS


def decodes_first(plan: StepPlan) -> bool:
    kinds = [c.num_tokens == 1 for c in plan.chunks]
    return kinds == sorted(kinds, reverse=True)


def make(name_or_cls):
    kv = KVBlockManager(256, 4)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=48, max_model_len=4096)
    if isinstance(name_or_cls, str):
        return make_scheduler(name_or_cls, config, kv)
    return name_or_cls(config, kv)


def drive(s, steps=60, seed=0) -> int:
    """Random arrivals of short and long prompts; returns how many plans mixed decodes and prefills."""
    rng = random.Random(seed)
    mixed = 0
    for i in range(steps):
        now = i * 0.01
        if i % 3 == 0:
            s.add(Request(f"r{i}", [rng.randrange(3, 500) for _ in range(rng.choice([3, 30, 90]))],
                          rng.randrange(2, 12), now, ignore_eos=True))
        plan = s.schedule(now)
        assert decodes_first(plan), [c.num_tokens for c in plan.chunks]
        mixed += any(c.num_tokens == 1 for c in plan.chunks) and any(c.num_tokens > 1 for c in plan.chunks)
        if plan:
            s.update(plan, [7 if c.samples else None for c in plan.chunks], now + 0.01, 0.01)
    return mixed


class PrefillsFirst(FCFS):
    """A policy that builds its plans prefills first, to show the guarantee does not rely on policies."""

    def schedule(self, now: float) -> StepPlan:
        plan = super().schedule(now)
        plan.chunks.sort(key=lambda c: c.num_tokens == 1)
        return plan


def test_a_policy_that_puts_prefills_first_still_yields_decodes_first():
    s = make(PrefillsFirst)
    assert drive(s) > 0  # the scenario does mix decodes and prefill chunks in one step


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_policy_plans_decodes_first(name):
    drive(make(name))
