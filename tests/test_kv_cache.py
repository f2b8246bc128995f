"""The KV block manager on its own: allocation, reference counts, LRU eviction order, prefix hits
across requests, freeing under preemption, and prefix-cache digests that no collision can turn into a
wrong hit. Pure Python, except the last test, which runs the engine with a digest that always collides."""

from __future__ import annotations

import pytest

import scheduling.kv_cache as kv_cache
from scheduling import KVBlockManager, Request

BS = 4


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), max_tokens=8, arrival_time=0.0)


def compute(kv: KVBlockManager, r: Request, n: int | None = None) -> None:
    """What a step does for `r`: blocks for its next `n` tokens (all by default), then they are computed."""
    n = r.num_uncomputed_tokens if n is None else n
    assert kv.allocate(r, n)
    r.num_computed_tokens += n
    kv.cache_full_blocks(r)


def computed_and_freed(kv: KVBlockManager, *prompts: range) -> list[list[int]]:
    """Run each prompt to completion, then free them in order; their blocks, in request order."""
    requests = [request(f"r{i}", p) for i, p in enumerate(prompts)]
    for r in requests:
        compute(kv, r)
    blocks = [list(r.block_ids) for r in requests]
    for r in requests:
        kv.free_request(r)
    return blocks


def invariants(kv: KVBlockManager, *live: Request) -> None:
    """Reference counts are exactly the live requests' holdings, and a block is free iff nobody holds it."""
    held = [0] * kv.num_blocks
    for r in live:
        for b in r.block_ids:
            held[b] += 1
    assert held == kv.ref_counts
    assert set(kv.free) == {b for b in range(kv.num_blocks) if held[b] == 0}
    assert all(kv.cached[digest] == b for b, digest in enumerate(kv.cached_digest) if digest is not None)


def test_allocation_is_all_or_nothing_and_counts_blocks():
    kv = KVBlockManager(4, BS)
    a = request("a", range(10))
    assert kv.num_blocks_needed(a, 10) == 3
    assert kv.allocate(a, 10) and len(a.block_ids) == 3 and kv.num_free_blocks == 1 and kv.usage == 0.75
    a.num_computed_tokens = 10
    assert kv.num_blocks_needed(a, 2) == 0 and kv.allocate(a, 2)  # the third block has room for 2 more
    assert kv.num_blocks_needed(a, 3) == 1
    b = request("b", range(100, 109))
    assert not kv.allocate(b, 9) and b.block_ids == [] and kv.num_free_blocks == 1  # needs 3, only 1 free
    assert kv.allocate(b, 4) and kv.num_free_blocks == 0
    invariants(kv, a, b)
    kv.free_request(a)
    kv.free_request(b)
    assert kv.num_free_blocks == 4 and a.block_ids == [] and a.num_computed_tokens == 0
    invariants(kv)


def test_prefix_hits_across_requests_share_blocks_with_ref_counts():
    kv = KVBlockManager(16, BS)
    prefix = list(range(10, 22))  # 3 full blocks
    a = request("a", prefix + [1, 2])
    assert kv.claim_cached_prefix(a) == 0
    compute(kv, a)
    b = request("b", prefix + [3, 4, 5])
    assert kv.claim_cached_prefix(b) == 12 and b.block_ids == a.block_ids[:3] and kv.num_prefix_hits == 12
    assert [kv.ref_counts[x] for x in a.block_ids] == [2, 2, 2, 1]
    compute(kv, b)
    invariants(kv, a, b)
    # A prompt that is exactly the prefix still computes its last token: its logits are sampled.
    c = request("c", prefix)
    assert kv.claim_cached_prefix(c) == 8 and c.block_ids == a.block_ids[:2]
    # Different first block: nothing, although later blocks are equal.
    d = request("d", [99] + prefix[1:] + [1])
    assert kv.claim_cached_prefix(d) == 0 and d.block_ids == []
    kv.free_request(a)
    kv.free_request(b)
    kv.free_request(c)
    invariants(kv)
    # Freed blocks keep their contents: a later request still hits them.
    e = request("e", prefix + [7])
    assert kv.claim_cached_prefix(e) == 12
    invariants(kv, e)


def test_lru_eviction_takes_the_least_recently_freed_and_suffixes_before_prefixes():
    kv = KVBlockManager(6, BS)
    a_blocks, b_blocks = computed_and_freed(kv, range(0, 12), range(100, 112))
    assert list(kv.free) == a_blocks[::-1] + b_blocks[::-1]  # a first (freed first), each tail first
    c = request("c", range(200, 208))  # two fresh blocks: a's tail and middle go, a's first block stays
    compute(kv, c)
    assert c.block_ids == [a_blocks[2], a_blocks[1]]
    a2, b2 = request("a2", list(range(0, 12)) + [5]), request("b2", list(range(100, 112)) + [5])
    assert kv.claim_cached_prefix(a2) == 4 and a2.block_ids == a_blocks[:1]
    assert kv.claim_cached_prefix(b2) == 12 and b2.block_ids == b_blocks
    invariants(kv, c, a2, b2)


def test_hit_moves_a_block_out_of_the_eviction_order_and_back_to_its_end():
    kv = KVBlockManager(4, BS)
    [first_a, _], _ = computed_and_freed(kv, range(0, 8), range(50, 58))
    again = request("again", list(range(0, 4)) + [9])  # reuses a's first block, then frees it
    assert kv.claim_cached_prefix(again) == 4 and kv.ref_counts[first_a] == 1 and first_a not in kv.free
    kv.free_request(again)
    assert list(kv.free)[-1] == first_a  # now the most recently freed: evicted last


def test_preemption_frees_everything_and_recompute_hits_own_blocks():
    kv = KVBlockManager(8, BS)
    a = request("a", range(0, 10))
    compute(kv, a, 6)  # a chunk of its prefill: one full block computed
    compute(kv, a, 4)
    a.token_ids += [60, 61, 62]  # three decoded tokens
    compute(kv, a, 2)
    kv.free_request(a)  # preempted: all blocks back, contents still findable
    assert a.block_ids == [] and a.num_computed_tokens == 0 and kv.num_free_blocks == 8
    invariants(kv)
    # The recompute covers prompt and output; its full blocks (3) come back from the cache.
    assert kv.claim_cached_prefix(a) == 12
    compute(kv, a)
    assert a.num_computed_tokens == 13
    invariants(kv, a)
    kv.free_request(a)
    invariants(kv)


def test_salt_changes_every_digest_but_not_what_hits():
    tokens = list(range(40))
    plain, salted = KVBlockManager(16, BS), KVBlockManager(16, BS, hash_salt="tenant secret")
    for kv in (plain, salted):
        compute(kv, request("a", tokens))
        assert kv.claim_cached_prefix(request("b", tokens + [1])) == 40
    assert set(plain.cached).isdisjoint(salted.cached)


def test_forced_collision_never_reuses_a_wrong_block(monkeypatch):
    """Every block gets the same digest, so each lookup finds whatever block was cached first: a hit is
    accepted only if that block holds these tokens after the block just matched. Shown to fail (this test,
    the next and the engine one below) with the check against the block's contents removed from
    `claim_cached_prefix`; the next one alone also fails with the parent's fill count left out of `_content`."""
    monkeypatch.setattr(kv_cache, "block_digest", lambda parent, tokens: b"\0" * 32)
    kv = KVBlockManager(32, BS)
    a = request("a", list(range(12)) + [1])
    compute(kv, a)
    assert len(kv.cached) == 1
    # Other tokens in the first block: the colliding digest finds a's first block, the tokens refuse it.
    assert kv.claim_cached_prefix(request("x", list(range(100, 112)) + [1])) == 0
    # Same first block: a real hit. The second block collides with the first block too and is refused,
    # since a block's parent is part of what it holds (the same tokens after another prefix have other KV).
    same = request("same", list(range(4)) * 3 + [1])
    assert kv.claim_cached_prefix(same) == 4
    invariants(kv, a, same)


def test_a_child_cached_after_an_evicted_parent_does_not_match(monkeypatch):
    """A block's KV depends on the blocks before it. With a digest blind to the parent, a child block cached
    after one filling of its parent must not match once the parent block is handed out again and refilled."""
    import hashlib
    monkeypatch.setattr(kv_cache, "block_digest", lambda parent, tokens: hashlib.sha256(bytes(tokens)).digest())
    kv = KVBlockManager(3, BS)
    a = request("a", list(range(8)) + [1])
    compute(kv, a)
    parent, child = a.block_ids[:2]
    kv.free_request(a)
    kv.free.move_to_end(parent, last=False)  # the manager's own order evicts the child first; force the parent
    b = request("b", list(range(100, 104)) + [1])
    compute(kv, b)  # refills `parent` with other tokens
    assert b.block_ids[0] == parent and kv.cached_digest[child] is not None
    kv.free_request(b)
    c = request("c", list(range(100, 104)) + list(range(4, 8)) + [1])
    assert kv.claim_cached_prefix(c) == 4 and c.block_ids == [parent]  # not `child`: it followed tokens 0..3


def test_engine_output_stays_exact_when_every_digest_collides(tiny_models, monkeypatch):
    from engine import LLM, SamplingParams
    prompts = [[5, 6, 7, 8] * 6 + [9], [5, 6, 7, 8] * 3 + [10, 11, 12, 13] * 3 + [9], list(range(30, 55)),
               [5, 6, 7, 8] * 6 + [10]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, block_size=4,
                    enable_prefix_caching=False)
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    monkeypatch.setattr(kv_cache, "block_digest", lambda parent, tokens: b"\0" * 32)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, block_size=4)
    got = [llm.generate([p], params)[0].token_ids for p in prompts]  # one by one: each may hit the last
    assert got == expected
    assert llm.engine.kv.num_prefix_hits > 0  # the genuine hit (the first block, 5 6 7 8) still happens
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("salt", ["", "s"])
def test_block_digest_is_sha256_chained_over_64_bit_tokens(salt):
    kv = KVBlockManager(4, BS, hash_salt=salt)
    r = request("r", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, r)
    import hashlib
    from array import array
    first = hashlib.sha256(kv.root_digest + array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert r.block_digests == [first, hashlib.sha256(first + array("q", [5, 6, 7, 8]).tobytes()).digest()]
