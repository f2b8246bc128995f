"""The engine: Llama-family models over a paged KV cache, run step by step by a scheduling policy.

`from engine import LLM, SamplingParams, EngineArgs`. Importing the package is cheap; torch and
transformers load when `LLM` or `EngineArgs` is first used, so processes that only speak the wire
messages (the balancer, the load generator) never import them.
"""

from .messages import SamplingParams


def __getattr__(name):
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "EngineArgs":
        from .config import EngineArgs
        return EngineArgs
    raise AttributeError(name)


__all__ = ["LLM", "EngineArgs", "SamplingParams"]
