"""The offline API, in the shape vLLM users know: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from .config import EngineArgs
from .demo import ensure_demo_model
from .detokenizer import IncrementalDetokenizer
from .engine_core import EngineCore
from .messages import GenerateRequest, SamplingParams, TopLogprobs
from .tokenizer import load_tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[TopLogprobs | None] | None = None
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.model_path = model or ensure_demo_model()
        self.engine = EngineCore(self.model_path, EngineArgs(**engine_args))
        self.tokenizer = load_tokenizer(self.model_path)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (also done at exit); a process holds one group at a time."""
        self.engine.runner.group.close()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        # Validate everything before submitting anything, so a bad prompt leaves no work behind.
        messages = []
        for prompt, p in zip(prompts, params):
            message = GenerateRequest(f"offline-{next(self._ids)}", self.encode(prompt), p, time.monotonic())
            self.engine.validate(message)
            messages.append(message)
        results: dict[str, RequestOutput] = {}
        detok: dict[str, IncrementalDetokenizer] = {}
        for message in messages:
            self.engine.add_request(message)
            results[message.request_id] = RequestOutput(message.request_id, message.prompt_token_ids)
            if self.tokenizer is not None:
                detok[message.request_id] = IncrementalDetokenizer(
                    self.tokenizer, message.prompt_token_ids, message.sampling.skip_special_tokens,
                    message.sampling.stop)
        pending = set(results)
        while pending:
            for out in self.engine.step():
                res = results[out.request_id]
                res.token_ids += out.new_token_ids
                if out.logprobs:
                    res.logprobs = (res.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                res.num_cached_tokens = out.num_cached_tokens
                d = detok.get(out.request_id)
                if d is not None:
                    res.text += d.push(out.new_token_ids, final=out.finish_reason is not None)
                    if d.stopped and out.finish_reason is None:
                        self.engine.abort(out.request_id)
                        out.finish_reason = "stop"
                if out.finish_reason is not None:
                    res.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
        return [results[r.request_id] for r in messages]
