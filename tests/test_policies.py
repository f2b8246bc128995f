"""Each scheduling policy's rules pinned on hand-built situations, plus a randomized soak per policy.

Pure Python: a real KVBlockManager, hand-made requests, schedule(now)/update(...) driven by hand
with made-up sampled tokens and step times.
"""

from __future__ import annotations

import random

import pytest

from scheduling import SCHEDULERS, KVBlockManager, Request, SchedulerConfig, Status, StepPlan, make_scheduler
from scheduling.policies.scls import fit_linear

EOS = 2


def req(rid, prompt_len, max_tokens=8, arrival=0.0, **kw) -> Request:
    rng = random.Random(rid)  # distinct prompts: no accidental prefix-cache hits
    return Request(rid, [rng.randrange(3, 500) for _ in range(prompt_len)], max_tokens, arrival, ignore_eos=True, **kw)


def make(name, knobs=None, num_blocks=64, block_size=4, budget=64, max_seqs=256):
    kv = KVBlockManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=4096,
                             eos_token_ids=frozenset({EOS}))
    return make_scheduler(name, config, kv, knobs), kv


def check_plan(s, plan, budget):
    """What every plan of every policy must satisfy."""
    assert plan.num_batched_tokens <= budget
    assert len({id(c.request) for c in plan.chunks}) == len(plan.chunks), "a request scheduled twice"
    for c in plan.chunks:
        r = c.request
        assert r.status is Status.RUNNING and r in s.running and r not in plan.preempted
        assert c.start == r.num_computed_tokens and 1 <= c.num_tokens <= r.num_uncomputed_tokens
        assert len(r.block_ids) * s.kv.block_size >= c.start + c.num_tokens, "chunk without KV"
    for r in plan.preempted:
        assert r.status is Status.WAITING and not r.block_ids and r in s.waiting


def step(s, now, dt=0.01, token=7, budget=None):
    plan = s.schedule(now)
    check_plan(s, plan, budget or s.config.max_num_batched_tokens)
    if plan:
        s.update(plan, [token if c.samples else None for c in plan.chunks], now + dt, dt)
    return plan


def served(plan):
    return [c.request.request_id for c in plan.chunks]


# ---- FCFS ----------------------------------------------------------------------------------------
def test_fcfs_preempts_newest_and_admits_nothing_that_step():
    s, kv = make("fcfs", num_blocks=6)
    a, b, c, late = req("a", 8, 20), req("b", 8, 20), req("c", 7, 20), req("late", 1)
    for r in (a, b, c):
        s.add(r)
    assert served(step(s, 0.0)) == ["a", "b", "c"] and kv.num_free_blocks == 0
    s.add(late)
    plan = step(s, 1.0)  # a and b each need a third block: the newest, c, makes room
    assert plan.preempted == [c] and served(plan) == ["a", "b"]
    assert list(s.waiting) == [c, late] and c.num_preemptions == 1 and s.num_preemptions == 1


# ---- Sarathi ---------------------------------------------------------------------------------------
def prefilling_then_decodes(s):
    """Running, in admission order: a half-prefilled 2000-token prompt `p`, then three decodes."""
    p, ds = req("p", 2000, 4), [req(f"d{i}", 4, 4) for i in range(3)]
    for r in (p, *ds):
        s.add(r)
    chunks = [s.admit(p, 0.0, 100)] + [s.admit(d, 0.0, 4) for d in ds]
    plan = StepPlan(chunks)
    s.update(plan, [7 if c.samples else None for c in plan.chunks], 0.01, 0.01)
    return p, ds


def test_sarathi_serves_decodes_before_prefill_chunks_within_budget():
    s, _ = make("sarathi", num_blocks=1000, budget=2048)  # the engine's budget is replaced by 512
    p, ds = prefilling_then_decodes(s)
    s.add(req("new", 10))
    plan = step(s, 1.0, budget=512)
    assert served(plan) == ["d0", "d1", "d2", "p"]
    assert plan.chunks[-1].num_tokens == 509 and plan.num_batched_tokens == 512
    # FCFS serves in admission order: the prefill takes the whole budget.
    f, _ = make("fcfs", num_blocks=1000, budget=512)
    prefilling_then_decodes(f)
    assert served(step(f, 1.0)) == ["p"]


def test_sarathi_preempts_only_requests_not_yet_served():
    s, kv = make("sarathi", num_blocks=5)
    old, p, new = req("old", 2, 4), req("p", 20, 4), req("new", 2, 4)
    for r in (old, p, new):
        s.add(r)
    chunks = [s.admit(old, 0.0, 2), s.admit(p, 0.0, 8), s.admit(new, 0.0, 2)]
    plan = StepPlan(chunks)
    s.update(plan, [7 if c.samples else None for c in plan.chunks], 0.01, 0.01)
    assert kv.num_free_blocks == 1
    plan = step(s, 1.0)  # decodes old, new fit; p's next chunk needs 3 blocks: p itself must go, not `new`
    assert served(plan) == ["old", "new"] and plan.preempted == [p]


# ---- ILS, SLS, static: worst-case reservation ------------------------------------------------------
def test_ils_reserves_prompt_plus_max_tokens_and_admits_in_order_only_what_fits():
    s, kv = make("ils", num_blocks=20)
    a, b, c = req("a", 8, 32), req("b", 8, 40), req("c", 4, 4)  # worst cases: 10, 12 and 2 blocks
    for r in (a, b, c):
        s.add(r)
    assert served(step(s, 0.0)) == ["a"]  # b's 12 blocks do not fit in the 10 left, and c may not pass it
    assert len(a.block_ids) == 10 and kv.num_free_blocks == 10
    while not a.is_finished:
        assert not step(s, 1.0).preempted and b.status is Status.WAITING
    assert served(step(s, 2.0)) == ["b", "c"]
    assert s.num_preemptions == 0


def test_ils_reservation_is_capped_by_the_context_length():
    s, kv = make("ils", num_blocks=20)
    s.config.max_model_len = 16
    a = req("a", 8, 1000)
    s.add(a)
    step(s, 0.0)
    assert len(a.block_ids) == kv.blocks_for(15)  # the last sampled token is never computed


def test_sls_batch_is_as_large_as_the_worst_cases_fit_and_runs_to_the_end():
    s, kv = make("sls", num_blocks=10)
    a, b, c, d = req("a", 4, 1), req("b", 4, 16), req("c", 4, 12), req("d", 4, 1)  # 1 + 5 + 4 blocks fill the pool; d needs 1 more
    for r in (a, b, c, d):
        s.add(r)
    now = 0.0
    assert served(step(s, now)) == ["a", "b", "c"] and a.is_finished
    assert s.batch == [a, b, c]
    while not b.is_finished:
        now += 1
        assert "d" not in served(step(s, now)), "d joined a batch under way"
    assert served(step(s, now + 1)) == ["d"]
    assert s.counters["sls_batches"] == 2 and s.num_preemptions == 0


def test_static_pads_every_member_to_the_longest_prompt_and_max_tokens():
    s, kv = make("static", num_blocks=12)
    a, b, c = req("a", 4, 4), req("b", 12, 4), req("c", 4, 4)  # padded: 12 + 4 - 1 = 15 tokens, 4 blocks each
    for r in (a, b, c):
        s.add(r)
    assert served(step(s, 0.0)) == ["a", "b", "c"]
    assert [len(r.block_ids) for r in (a, b, c)] == [4, 4, 4] and kv.num_free_blocks == 0
    s, kv = make("static", num_blocks=11)  # three padded members no longer fit: two per batch
    for r in (req("a", 4, 4), req("b", 12, 4), req("c", 4, 4)):
        s.add(r)
    assert served(step(s, 0.0)) == ["a", "b"]


# ---- priority ----------------------------------------------------------------------------------------
def test_priority_admits_by_priority_then_arrival():
    s, kv = make("priority", budget=64)
    reqs = [req("late-urgent", 4, arrival=3.0, priority=-1), req("first", 4, arrival=0.0, priority=0),
            req("low", 4, arrival=1.0, priority=5), req("second", 4, arrival=2.0, priority=0)]
    for r in reqs:
        s.add(r)
    assert served(step(s, 4.0)) == ["late-urgent", "first", "second", "low"]


def test_priority_preempts_the_least_urgent_running_request_first():
    s, kv = make("priority", num_blocks=6)
    # Admitted in this order; the least urgent (largest priority) is neither the newest nor the oldest.
    a, b, c = req("a", 8, 20, priority=0), req("b", 8, 20, priority=3, arrival=1.0), req("c", 7, 20, priority=1, arrival=2.0)
    for r in (a, b, c):
        s.add(r)
    assert served(step(s, 3.0)) == ["a", "c", "b"] and kv.num_free_blocks == 0
    plan = step(s, 4.0)  # a needs a third block: b gives way, where FCFS would preempt the newest, c
    assert plan.preempted == [b] and served(plan) == ["a", "c"]
    f, _ = make("fcfs", num_blocks=6)
    for r in (req("a", 8, 20), req("b", 8, 20, arrival=1.0), req("c", 7, 20, arrival=2.0)):
        f.add(r)
    step(f, 3.0)
    assert [r.request_id for r in step(f, 4.0).preempted] == ["c"]


def test_only_the_priority_policy_honors_priority():
    assert [name for name, cls in sorted(SCHEDULERS.items()) if cls.honors_priority] == ["priority"]


# ---- Sarathi's admission ------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len, watermark, admitted", [(396, 0.01, True), (400, 0.01, False), (400, 0.0, True)])
def test_sarathi_admits_only_a_whole_prompt_that_leaves_the_watermark_free(prompt_len, watermark, admitted):
    s, kv = make("sarathi", {"token_budget": 64, "watermark": watermark}, num_blocks=100)  # 1% = 1 block
    r = req("r", prompt_len)
    s.add(r)
    assert served(step(s, 0.0)) == (["r"] if admitted else [])
    if admitted:
        assert len(r.block_ids) == kv.blocks_for(prompt_len)  # the whole prompt, at once


# ---- LARRY ---------------------------------------------------------------------------------------
def larry_with_hog(prompt_len, max_tokens, **knobs):
    """LARRY on 100 blocks of 4 tokens with one running request, and two waiting ones: a large
    request (arrived at 0) ahead of a small one (arrived at 0.1)."""
    s, kv = make("larry", knobs, num_blocks=100, budget=512)
    s.add(req("hog", prompt_len, max_tokens))
    step(s, 0.0)
    big, small = req("big", 40, 60, arrival=0.0), req("small", 8, 8, arrival=0.1)
    s.add(big)
    s.add(small)
    return s, kv, big, small


def test_larry_defers_a_large_request_under_memory_pressure():
    # hog: 50 blocks held, 85 expected at its end: pressure 0.85; 15 blocks projected free.
    s, kv, big, small = larry_with_hog(200, 140)
    plan = step(s, 1.0)
    assert served(plan) == ["hog", "small"]  # big needs 25 blocks by its end
    assert big.status is Status.WAITING and s.counters == {"larry_deferred": 1}


def test_larry_admits_in_arrival_order_under_low_pressure():
    s, kv, big, small = larry_with_hog(40, 8)
    assert served(step(s, 1.0)) == ["hog", "big", "small"]
    assert "larry_deferred" not in s.counters


def test_larry_ages_a_deferred_request_in():
    s, kv, big, small = larry_with_hog(200, 140, max_wait_s=10.0)
    assert served(step(s, 9.0)) == ["hog", "small"]
    assert served(step(s, 10.0)) == ["hog", "small", "big"]  # waited 10 s: in, whatever the pressure
    assert s.counters["larry_aged"] == 1


@pytest.mark.parametrize("knobs, order", [
    ({}, ["hog", "small"]),  # big's demand does not fit the projected free memory
    ({"smallest_first": False}, ["hog"]),  # the head, big, does not fit: admission stops
    ({"fit_check": False}, ["hog", "small", "big"]),  # smallest first, nothing held back
    ({"smallest_first": False, "fit_check": False}, ["hog", "big", "small"]),  # FCFS
])
def test_larry_ablations(knobs, order):
    s, kv, big, small = larry_with_hog(200, 140, **knobs)
    assert served(step(s, 1.0)) == order


# ---- SLAI ----------------------------------------------------------------------------------------
def slai_with_decode(budget=16, **knobs):
    """SLAI with one decode whose LST is 0.01 + 0.1 - 5 * 0.01 = 0.06, and three new prompts."""
    s, kv = make("slai", {"token_budget": budget, "tbt_ms": 100.0, **knobs}, num_blocks=100)
    s.add(req("d", 4, 10))
    step(s, 0.0, dt=0.01)
    assert s.running[0].policy_state["slai_lst"] == pytest.approx(0.06)
    for rid, n in (("long", 12), ("short", 5), ("mid", 8)):
        s.add(req(rid, n))
    return s, kv


def test_slai_serves_critical_decode_first_then_shortest_prefill_first():
    s, _ = slai_with_decode(budget=16)
    plan = step(s, 0.07, budget=16)
    assert served(plan) == ["d", "short", "mid", "long"]
    assert [c.num_tokens for c in plan.chunks] == [1, 5, 8, 2]
    assert s.counters["slai_critical_decodes"] == 1


def test_slai_serves_non_critical_decodes_after_prefills():
    s, _ = slai_with_decode(budget=16)
    assert served(step(s, 0.05, budget=16)) == ["short", "mid", "long"]  # budget spent: d waits
    s, _ = slai_with_decode(budget=40)
    # d was chosen last, after the prefills; the plan runs it first, as every plan runs its decodes.
    assert served(step(s, 0.05, budget=40)) == ["d", "short", "mid", "long"]


def test_slai_uses_the_request_tbt_and_the_high_kv_delta():
    s, kv = make("slai", {"tbt_ms": 100.0, "high_kv_frac": 0.5}, num_blocks=4)
    s.add(req("a", 4, 10, tbt_slo_s=1.0))
    step(s, 0.0, dt=0.01)  # a holds 1 of 4 blocks: delta 5
    assert s.running[0].policy_state["slai_lst"] == pytest.approx(0.01 + 1.0 - 5 * 0.01)
    s.add(req("b", 8, 10))
    step(s, 0.02, dt=0.01)  # now all 4 blocks are in use: delta 10
    assert s.running[1].policy_state["slai_lst"] == pytest.approx(0.03 + 0.1 - 10 * 0.01)


@pytest.mark.parametrize("knobs, order", [({}, ["strict", "short"]), ({"strict_first": False}, ["short", "strict"])])
def test_slai_orders_strict_users_first_by_default(knobs, order):
    s, kv = make("slai", {"token_budget": 64, **knobs}, num_blocks=100)
    s.add(req("short", 4))
    s.add(req("strict", 12, tbt_slo_s=0.1))  # tighter than the default 500 ms
    assert served(step(s, 0.0)) == order


@pytest.mark.parametrize("now, order", [(4.5, ["short", "old"]), (6.0, ["old", "short"])])
def test_slai_max_wait_extension_puts_requests_waiting_too_long_first(now, order):
    s, kv = make("slai", {"token_budget": 64, "max_wait_s": 5.0}, num_blocks=100)
    s.add(req("old", 12, arrival=0.0))
    s.add(req("short", 4, arrival=4.0))
    assert served(step(s, now)) == order


def test_slai_admits_a_prefill_only_if_its_whole_prompt_fits():
    s, kv = make("slai", {"token_budget": 8}, num_blocks=8)
    s.add(req("d", 12, 1))  # 3 blocks, reserved at once
    assert served(step(s, 0.0)) == ["d"]
    w = req("w", 24)  # 6 blocks; a 4-token chunk would fit in the 5 free
    s.add(w)
    assert served(step(s, 1.0)) == ["d"]  # d's last 4 prompt tokens; w waits
    assert served(step(s, 2.0)) == ["w"]  # d finished: now all of w fits, and is reserved at once
    assert len(w.block_ids) == 6 and w.num_computed_tokens == 8


def test_slai_out_of_kv_preempts_the_paused_prefill_else_the_decode():
    s, kv = make("slai", {"token_budget": 8, "tbt_ms": 100.0}, num_blocks=6)
    d = req("d", 4, 10)
    s.add(d)
    step(s, 0.0)  # d: 1 full block; its next token needs a second
    p = req("p", 20)
    s.add(p)
    assert served(step(s, 0.02)) == ["p"] and kv.num_free_blocks == 0  # p reserved 5 blocks, 8 done
    plan = step(s, 0.1)  # d is critical
    assert plan.preempted == [p] and served(plan) == ["d"]
    assert s.counters["slai_preempted_prefills"] == 1

    s, kv = make("slai", {"tbt_ms": 100.0}, num_blocks=2)
    d1, d2 = req("d1", 4, 10), req("d2", 4, 10)
    s.add(d1)
    s.add(d2)
    step(s, 0.0)
    plan = step(s, 0.1)  # both critical, no prefill to take from: d1 gives way itself, not the newest
    assert plan.preempted == [d1] and served(plan) == ["d2"]


# ---- SCLS ----------------------------------------------------------------------------------------
def test_scls_returns_a_request_to_the_queue_after_a_slice_keeping_its_kv():
    s, kv = make("scls", {"slice_len": 4})
    r = req("r", 6, 10)
    s.add(r)
    for now in range(4):  # prefill (first token) and three decodes: a slice of 4
        assert served(step(s, float(now))) == ["r"]
    assert r.status is Status.WAITING and list(s.waiting) == [r] and not s.running
    assert r.num_computed_tokens == 9 and len(r.block_ids) == 3 and s.counters["scls_slices"] == 1
    plan = step(s, 4.0)
    assert served(plan) == ["r"] and plan.chunks[0].start == 9 and plan.chunks[0].num_tokens == 1  # no recompute
    now = 5.0
    while not r.is_finished:
        step(s, now)
        now += 1
    assert r.num_output_tokens == 10 and kv.num_free_blocks == kv.num_blocks
    assert s.counters == {"scls_batches": 3, "scls_slices": 2}


def test_scls_admits_only_batches_whose_slice_fits():
    s, kv = make("scls", {"slice_len": 8}, num_blocks=10)
    rs = [req(f"r{i}", 12, 8) for i in range(3)]  # each slice ends holding blocks(12 + 8 - 1) = 5 blocks
    for r in rs:
        s.add(r)
    assert served(step(s, 0.0)) == ["r0", "r1"] and rs[2].status is Status.WAITING
    now = 1.0
    while s.has_work():
        step(s, now)
        now += 1
    assert s.num_preemptions == 0 and all(r.num_output_tokens == 8 for r in rs)


def test_scls_dp_packs_the_fewest_batches_by_length():
    s, kv = make("scls", {"slice_len": 4}, num_blocks=10)
    # Slice blocks 5, 2, 5, 2, 2, 2 in arrival order: FCFS packing needs 3 batches, sorted needs 2.
    for i, n in enumerate((17, 4, 17, 4, 4, 4)):
        s.add(req(f"r{i}", n))
    batches = s.plan_batches()
    assert [[r.request_id for r in b] for b in batches] == [["r1", "r3", "r4", "r5"], ["r0", "r2"]]


def test_scls_time_model_fit():
    true = (5e-3, 3e-5, 2e-4, 1e-7)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        x = (1.0, rng.randrange(1, 2048), rng.randrange(1, 256), rng.randrange(1, 200_000))
        samples.append((x, sum(c * v for c, v in zip(true, x))))
    assert fit_linear(samples, (1e-2, 1e-5, 1e-5, 1e-8)) == pytest.approx(true, rel=0.01)
    # Decode-only steps (tokens == sequences) cannot separate the two; the fit still predicts.
    decode = [((1.0, n, n, 300.0 * n), 5e-3 + 2.3e-4 * n + 3e-5 * n) for n in range(1, 100)]
    coef = fit_linear(decode, (1e-2, 1e-5, 1e-5, 1e-8))
    for x, y in decode:
        assert sum(c * v for c, v in zip(coef, x)) == pytest.approx(y, rel=0.02)


def test_scls_never_preempts_and_never_outgrows_its_reservation():
    def check(s, plan):
        assert not plan.preempted
        for r in s.running:  # the rest of the slice is already allocated
            left = r.policy_state["scls_until"] - r.num_output_tokens
            assert len(r.block_ids) * s.kv.block_size >= r.num_tokens + left - 1
    for seed in range(4):
        s = soak("scls", seed, {"slice_len": 8, "max_batch": 6}, n=120, on_plan=check)
        assert s.num_preemptions == 0 and s.counters["scls_recomputes"] > 0


# ---- every policy: randomized soak -----------------------------------------------------------------
SOAK_KNOBS = {
    "larry": {"max_wait_s": 0.02},
    "sarathi": {"token_budget": 32, "max_running": 12},
    "scls": {"slice_len": 8},
    "slai": {"token_budget": 32, "max_active": 12, "max_decodes": 8},
}


def soak(name, seed, knobs=None, n=80, on_plan=None):
    """Random arrivals, prompts (some sharing prefixes), lengths and aborts, on 48 blocks of 4
    tokens, driven to the end; every request must finish with all its tokens and no KV may leak."""
    rng = random.Random(seed)
    s, kv = make(name, knobs, num_blocks=48, budget=32)
    budget = (knobs or {}).get("token_budget", 32)
    prefixes = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    reqs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(50)
        shared = rng.choice(prefixes) if rng.random() < 0.5 else []
        prompt = shared + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
        reqs.append(Request(f"r{i}", prompt, rng.randrange(1, 40), t, ignore_eos=True,
                            tbt_slo_s=rng.choice([None, 0.02, 0.5])))
    pending, aborted, now = list(reqs), set(), 0.0
    for _ in range(20_000):
        if not pending and not s.has_work():
            break
        while pending and pending[0].arrival_time <= now:
            s.add(pending.pop(0))
        if s.requests and rng.random() < 0.01:
            rid = rng.choice(sorted(s.requests))
            aborted.add(rid)
            s.abort(rid)
        plan = s.schedule(now)
        check_plan(s, plan, budget)
        if on_plan:
            on_plan(s, plan)
        assert plan or plan.preempted or not s.has_work(), "work left but nothing scheduled"
        dt = 0.002 + 1e-5 * plan.num_batched_tokens
        now += dt
        if plan:
            tokens = [rng.choice([EOS, rng.randrange(3, 500)]) if c.samples else None for c in plan.chunks]
            s.update(plan, tokens, now, dt)
    else:
        pytest.fail("did not finish")
    for r in reqs:
        assert r.is_finished
        if r.request_id in aborted:
            assert r.finish_reason == "abort"
        else:
            assert r.finish_reason == "length" and r.num_output_tokens == r.max_tokens
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"
    assert not s.requests and not s.waiting and not s.running
    return s


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_soak(name, seed):
    s = soak(name, seed, SOAK_KNOBS.get(name))
    # The pool is small enough for each policy's memory paths to run.
    if name == "larry":
        assert s.counters["larry_deferred"] > 0 and s.counters["larry_aged"] > 0
    elif name == "scls":
        assert s.num_preemptions == 0 and s.counters["scls_slices"] > 0
    elif name in ("fcfs", "priority", "sarathi", "slai"):
        assert s.num_preemptions > 0
    elif name in ("ils", "sls", "static"):
        assert s.num_preemptions == 0  # worst case reserved up front


# ---- the shared expected-output rule -------------------------------------------------------------------
@pytest.mark.parametrize("mode, expected", [("history", 100.0), ("max-tokens", 500.0), ("oracle", 500.0)])
def test_expected_output_follows_the_configured_mode(mode, expected):
    kv = KVBlockManager(64, 4)
    s = make_scheduler("larry", SchedulerConfig(max_model_len=4096, output_length=mode), kv)
    for _ in range(3):  # finished requests with 20-token prompts all produced 100 tokens
        s.output_lengths.observe(prompt_tokens=20, output_tokens=100)
    r = Request("r", [5] * 20, 500, 0.0)
    assert s.expected_output(r) == expected
    assert s.expected_output(Request("long", [5] * 3000, 500, 0.0)) == (128.0 if mode == "history" else 500.0)
    r.ignore_eos = True  # a request that says it runs to its limit is taken at its word in every mode
    assert s.expected_output(r) == 500.0
    assert s.stats().output_lengths.mode == mode
