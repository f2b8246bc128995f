"""The sampler's random draws: tokens come with the probabilities the parameters give them, tokens of
probability zero never come, and a seeded row draws the same token whatever else is in its batch."""

import math

import torch

from engine.messages import SamplingParams
from engine.sampler import SamplingBatch, SamplingRow, draw, sample


def test_draw_follows_the_probabilities_and_never_takes_a_zero():
    torch.manual_seed(0)
    n = 40_000
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.0, 0.4]).repeat(n, 1) * 0.37  # rows need not sum to 1
    tokens = draw(probs, torch.rand(n, 1, dtype=torch.float64))
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[1] == counts[4] == 0
    expected = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.0, 0.4], dtype=torch.float64) * n
    kept = expected > 0
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < 16.3, (counts, chi2)  # 3 degrees of freedom: exceeded with probability 0.001
    # The extremes of U[0, 1): the first token with mass, and the last one (never the zero after it).
    edge = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).repeat(2, 1)
    assert draw(edge, torch.tensor([[0.0], [1.0 - 2 ** -53]], dtype=torch.float64)).tolist() == [1, 2]


def test_sample_matches_softmax_at_temperature_and_top_p():
    torch.manual_seed(1)
    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.5, top_p=0.9)
    batch = SamplingBatch([SamplingRow(params, [1], [])] * n, torch.device("cpu"))
    tokens = torch.tensor(sample(logits.repeat(n, 1), batch).token_ids)
    p = torch.softmax(logits / 0.5, dim=-1)  # 0.867, 0.117, 0.016, 0.002: top_p 0.9 keeps the first two
    kept = p[:2] / p[:2].sum()
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2:].sum() == 0
    share = counts[0].item() / n
    assert abs(share - kept[0].item()) < 4 * math.sqrt(kept[0] * kept[1] / n), (share, kept)


def test_a_seeded_row_draws_the_same_whatever_its_batch():
    logits = torch.randn(1, 300)
    seeded = SamplingRow(SamplingParams(temperature=1.0, seed=7), [1], [5, 6])
    alone = sample(logits, SamplingBatch([seeded], torch.device("cpu"))).token_ids[0]
    others = [SamplingRow(SamplingParams(temperature=1.0), [1], []) for _ in range(5)]
    batch = SamplingBatch(others[:2] + [seeded] + others[2:], torch.device("cpu"))
    in_batch = sample(torch.cat([torch.randn(2, 300), logits, torch.randn(3, 300)]), batch).token_ids[2]
    assert in_batch == alone
    # A different output index draws afresh: over 20 positions the seeded row does not repeat one token.
    draws = {sample(logits, SamplingBatch([SamplingRow(SamplingParams(temperature=1.0, seed=7), [1], [0] * k)],
                                          torch.device("cpu"))).token_ids[0] for k in range(20)}
    assert len(draws) > 1
