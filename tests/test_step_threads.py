"""CPU intra-op threads chosen per step: all the worker's threads for a step with enough matmul work, one
fewer for a small one (ModelRunner.step_threads), switched as the steps of one generation change size."""

from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner


def test_threads_follow_the_step_size(tiny_models, monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # The tiny model: ~0.15M matmul flops per token; a 200-token prefill is ~0.03 GFLOP, a decode far less.
        llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=64, cpu_parallel_min_gflop=0.02)
        runner = llm.engine.runner
        assert runner.max_threads == 2
        used = []
        step_threads = ModelRunner.step_threads

        def recording(self, layout):
            used.append((layout.num_tokens, step_threads(self, layout)))
            return used[-1][1]
        monkeypatch.setattr(ModelRunner, "step_threads", recording)
        out = llm.generate([list(range(3, 203))], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert len(out[0].token_ids) == 3
        assert used[0] == (200, 2), "the prefill has the work for both threads"
        assert used[1:] == [(1, 1), (1, 1)], "decodes of one sequence leave a core free"
        assert torch.get_num_threads() == 1  # set for the last step
    finally:
        torch.set_num_threads(previous)
