"""The engine: Llama-family models over a paged KV cache, run step by step by a scheduling policy."""

from .config import EngineArgs
from .messages import SamplingParams


def __getattr__(name):
    # `LLM` pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from .llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineArgs", "SamplingParams"]
