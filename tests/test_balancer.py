"""Each balancer policy's choice pinned on hand-built worker loads."""

from __future__ import annotations

import random

import pytest

from balancer import WorkerLoad, make_balancer
from engine.messages import GenerateRequest, LoadReport, SamplingParams
from scheduling import SchedulerStats
from scheduling.output_length import PRIOR, OutputLengths


def report(worker_id, running=0, waiting=0, outstanding=0.0, requests_in=0, **kw) -> LoadReport:
    stats = dict(num_running=running, num_waiting=waiting, kv_blocks_total=1000, mean_step_time=0.01,
                 expected_output_tokens=64.0, outstanding_tokens=outstanding,
                 output_lengths=OutputLengths("history", [64.0] * 4, [1] * 4))
    return LoadReport(worker_id, SchedulerStats(**(stats | kw)), requests_in=requests_in)


def gen(rid, prompt_len=100, max_tokens=50, ignore_eos=True) -> GenerateRequest:
    return GenerateRequest(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), 0.0)


def loads(*reports) -> list[WorkerLoad]:
    workers = []
    for r in reports:
        w = WorkerLoad(r.worker_id)
        w.record_report(r)
        workers.append(w)
    return workers


def test_sal_prefers_fewer_outstanding_tokens_over_fewer_requests():
    # Worker 0 runs one long request; worker 1 runs six short ones but owes fewer tokens.
    workers = loads(report(0, running=1, outstanding=5000), report(1, running=6, outstanding=1200))
    assert make_balancer("sal").choose(gen("q"), workers) == 1
    assert make_balancer("least-loaded").choose(gen("q"), workers) == 0  # by requests: the other way


def test_sal_counts_unreported_sends_exactly_and_forgets_reported_ones():
    sal = make_balancer("sal")
    w = loads(report(0, outstanding=1000))[0]
    w.record_sent(gen("a", prompt_len=100, max_tokens=50))  # ignore_eos: exactly 100 + 50
    w.record_sent(gen("b", prompt_len=200, max_tokens=1000, ignore_eos=False))  # 200 + the reported mean, 64
    assert sal.load(w) == 1000 + 150 + 264
    w.record_report(report(0, outstanding=1200, requests_in=1))  # covers "a" only
    assert [u.request_id for u in w.unreported] == ["b"]
    assert sal.load(w) == 1200 + 264
    w.record_report(report(0, outstanding=1300, requests_in=2))
    assert w.unreported == [] and sal.load(w) == 1300


def test_sal_uses_the_schedulers_prior_before_a_report_and_caps_by_max_tokens():
    sal = make_balancer("sal")
    w = WorkerLoad(0)
    w.record_sent(gen("a", prompt_len=10, max_tokens=1000, ignore_eos=False))
    w.record_sent(gen("b", prompt_len=10, max_tokens=20, ignore_eos=False))
    assert sal.load(w) == (10 + PRIOR) + (10 + 20)


def test_sal_predicts_with_the_mode_and_buckets_the_worker_reported():
    sal = make_balancer("sal")
    history = OutputLengths("history")
    for _ in range(3):
        history.observe(prompt_tokens=50, output_tokens=40)  # short prompts: short answers
        history.observe(prompt_tokens=3000, output_tokens=400)
    w = loads(report(0, output_lengths=history))[0]
    w.record_sent(gen("short", prompt_len=50, max_tokens=1000, ignore_eos=False))
    w.record_sent(gen("long", prompt_len=3000, max_tokens=1000, ignore_eos=False))
    assert sal.load(w) == (50 + 40) + (3000 + 400)
    w = loads(report(0, output_lengths=OutputLengths("max-tokens")))[0]
    w.record_sent(gen("short", prompt_len=50, max_tokens=1000, ignore_eos=False))
    assert sal.load(w) == 50 + 1000


def test_sal_breaks_ties_round_robin_and_routes_on_its_own_sends():
    sal = make_balancer("sal")
    workers = [WorkerLoad(i) for i in range(3)]
    chosen = []
    for i, prompt_len in enumerate([1000, 10, 10, 10, 10, 10]):  # no reports: only the sends count
        request = gen(str(i), prompt_len=prompt_len)
        w = sal.choose(request, workers)
        workers[w].record_sent(request)
        chosen.append(w)
    assert chosen == [0, 1, 2, 1, 2, 1]  # worker 0 holds the big one; the others tie, in turn


def test_power_of_two_takes_the_less_loaded_of_two_seeded_samples():
    workers = loads(*(report(i, running=n) for i, n in enumerate([5, 1, 3, 9])))
    picks = set()
    for seed in range(40):
        a, b = random.Random(seed).sample(workers, 2)
        expected = min((a, b), key=lambda w: w.in_flight).worker_id
        assert make_balancer("power-of-two", seed=seed).choose(gen("q"), workers) == expected
        picks.add(expected)
    # Not least-loaded: a pair without worker 1 picks someone else; the busiest always loses.
    assert 1 in picks and len(picks) > 1 and 3 not in picks


def test_least_loaded_counts_reported_and_unreported_requests():
    workers = loads(report(0, running=2, waiting=1), report(1, running=1))
    ll = make_balancer("least-loaded")
    assert ll.choose(gen("q"), workers) == 1
    workers[1].record_sent(gen("x"))
    workers[1].record_sent(gen("y"))  # now 3 in flight, and worker 0's 3 win the tie by id
    assert [w.in_flight for w in workers] == [3, 3]
    assert ll.choose(gen("q"), workers) == 0


def test_round_robin_skips_dead_workers():
    workers = [WorkerLoad(i) for i in range(4)]
    workers[2].alive = False
    rr = make_balancer("round-robin")
    live = [w for w in workers if w.alive]
    assert [rr.choose(gen("q"), live) for _ in range(6)] == [0, 1, 3, 0, 1, 3]


def test_scls_picks_the_smallest_estimated_finish_time():
    # Worker 0: one request with a long decode ahead. Worker 1: eight requests with short decodes
    # but a large context, so its steps are slower for the whole of the new request's output.
    workers = loads(report(0, running=1, outstanding=5000, running_tokens=1000),
                    report(1, running=8, outstanding=2400, running_tokens=8000))
    scls = make_balancer("scls")
    q = gen("q", prompt_len=100, max_tokens=100)
    finish = [scls.finish_time(q, w) for w in workers]
    assert finish[0] < finish[1]
    assert scls.choose(q, workers) == 0
    assert make_balancer("sal").choose(q, workers) == 1  # token counting alone says the other
    # Queued prefill delays the first token: a backlog of prompts on worker 0 flips the choice.
    workers[0].record_report(report(0, running=1, waiting=20, outstanding=45000, running_tokens=1000,
                                    waiting_prefill_tokens=40000))
    assert scls.choose(q, workers) == 1
    assert scls.finish_time(q, workers[0]) > scls.finish_time(q, workers[1])


def test_scls_counts_unreported_requests():
    scls = make_balancer("scls")
    idle = [WorkerLoad(0), WorkerLoad(1)]
    q = gen("q", prompt_len=500, max_tokens=200)
    before = scls.finish_time(q, idle[0])
    assert before == pytest.approx(scls.finish_time(q, idle[1]))
    idle[0].record_sent(gen("x", prompt_len=4000, max_tokens=200))
    assert scls.finish_time(q, idle[0]) > before
    assert scls.choose(q, idle) == 1
