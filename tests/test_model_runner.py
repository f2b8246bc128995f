"""The model runner's host side: the input buffers that eager and CUDA-graph steps share (block-table
rows written incrementally, padding rows, growth for a policy's larger budget) and a model that keeps
no autograd state. Token exactness through the runner is in test_engine_hf.py."""

from __future__ import annotations

import torch
from test_engine_hf import check_against_hf, mixed_prompts

from engine import LLM
from engine.model_runner import StepInputs
from engine.step_inputs import InputBuffers
from scheduling import Chunk, Request


def test_model_keeps_no_autograd_state(tiny_models):
    """Parameters do not require grad, so a forward outside inference_mode (CUDA-graph capture was one)
    records nothing: no grad_fn on the hidden states or the logits (both fail if the loader leaves
    requires_grad on)."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64)
    runner = llm.engine.runner
    assert not any(p.requires_grad for p in runner.model.parameters())
    request = Request("r", [5, 6, 7, 8, 9], 4, 0.0)
    request.block_ids = [0]
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    chunks = [Chunk(request, 0, 5)]  # (runner.prepare would want sampling parameters on the request)
    hidden = runner.forward(StepInputs.forward_only(runner.inputs.write(chunks, len(chunks), [])))
    logits = runner.model.compute_logits(hidden)
    assert hidden.grad_fn is None and logits.grad_fn is None and not logits.requires_grad



def test_input_buffers_rows_follow_their_requests():
    bs, scratch = 4, 99
    buf = InputBuffers(max_tokens=64, max_seqs=8, max_blocks_per_seq=8, block_size=bs, scratch_block=scratch,
                       device=torch.device("cpu"))
    a, b = Request("a", list(range(10, 19)), 8, 0.0), Request("b", list(range(30, 36)), 8, 0.0)
    a.block_ids, b.block_ids = [3, 7, 1], [5, 2]
    # Step 1: a decodes its 9th token, b prefills 6 tokens.
    lay = buf.write([Chunk(a, 8, 1), Chunk(b, 0, 6)], 2, [0, 1])
    assert (lay.num_tokens, lay.num_decodes, lay.query_lens, lay.seq_lens) == (7, 1, [1, 6], [9, 6])
    assert buf.ids[:7].tolist() == [18, 30, 31, 32, 33, 34, 35]
    assert buf.positions[:7].tolist() == [8, 0, 1, 2, 3, 4, 5]
    assert buf.slots[:7].tolist() == [1 * bs + 0, 5 * bs, 5 * bs + 1, 5 * bs + 2, 5 * bs + 3, 2 * bs, 2 * bs + 1]
    assert buf.qsl[:3].tolist() == [0, 1, 7] and buf.sample_index[:2].tolist() == [0, 6]
    assert buf.tables[0, :3].tolist() == [3, 7, 1] and buf.tables[1, :2].tolist() == [5, 2]
    # Step 2: rows swap requests; b grew a block; a was preempted and re-admitted with new blocks (a new
    # list of the same length: must not be mistaken for the old one).
    a.token_ids.append(19)
    b.token_ids.append(36)
    b.block_ids.append(6)
    a.block_ids = [4, 0, 8]
    lay = buf.write([Chunk(b, 6, 1), Chunk(a, 0, 10)], 2, [0, 1])
    assert buf.tables[0, :3].tolist() == [5, 2, 6] and buf.tables[1, :3].tolist() == [4, 0, 8]
    assert buf.slots[0] == 2 * bs + 2 and buf.slots[10] == 8 * bs + 1
    # Step 3: one decode padded to a batch of 4: padding rows read and write only the scratch block.
    b.token_ids.append(37)
    lay = buf.write([Chunk(b, 7, 1)], 4, [0])
    assert (lay.num_seqs, lay.num_rows) == (1, 4)
    assert buf.ids[:4].tolist() == [37, 0, 0, 0] and buf.qsl[:5].tolist() == [0, 1, 2, 3, 4]
    assert buf.slots[1:4].tolist() == [scratch * bs] * 3 and buf.seq_lens[1:4].tolist() == [1, 1, 1]
    assert buf.tables[1:4, 0].tolist() == [scratch] * 3
    # Step 4: the row padding overwrote is written afresh when a request takes it again.
    a.token_ids.append(20)
    lay = buf.write([Chunk(b, 7, 1), Chunk(a, 10, 1)], 2, [])
    assert buf.tables[1, :3].tolist() == [4, 0, 8]
    # Step 5: a's list refilled in place (not the KV manager's way, but caught): the row is rewritten.
    a.block_ids[:] = [6, 9, 10, 11]
    a.token_ids.append(21)
    buf.write([Chunk(b, 7, 1), Chunk(a, 11, 1)], 2, [])
    assert buf.tables[1, :4].tolist() == [6, 9, 10, 11]


def test_buffers_grow_for_a_policy_budget_beyond_the_engines(tiny_models):
    """Sarathi's own token budget (256) exceeds the engine's (32) that sized the buffers."""
    path = tiny_models["llama"]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=32, max_num_seqs=8,
              scheduler="sarathi", scheduler_knobs={"token_budget": 256})
    assert llm.engine.runner.inputs.max_tokens == 32
    check_against_hf(llm, path, mixed_prompts(n=4))
    assert llm.engine.runner.inputs.max_tokens >= 256
