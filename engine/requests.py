"""The one conversion from a wire request to the scheduler's request, shared by the engine and the
simulator so that both hand the policies the same thing."""

from __future__ import annotations

from typing import Any

from scheduling import Request

from .messages import GenerateRequest


def scheduler_request(wire: GenerateRequest, payload: Any) -> Request:
    """`payload` rides along opaque to the policies: the engine's model runner reads the sampling
    parameters from it, the simulator its record of the request."""
    s, slo = wire.sampling, wire.slo
    return Request(
        request_id=wire.request_id, prompt_token_ids=list(wire.prompt_token_ids), max_tokens=s.max_tokens,
        arrival_time=wire.arrival_time, min_tokens=s.min_tokens, ignore_eos=s.ignore_eos,
        stop_token_ids=frozenset(s.stop_token_ids), priority=wire.priority,
        ttft_slo_s=None if slo.ttft_ms is None else slo.ttft_ms / 1000,
        tbt_slo_s=None if slo.tbt_ms is None else slo.tbt_ms / 1000,
        skip_prefix_cache=s.prompt_logprobs is not None, payload=payload)
