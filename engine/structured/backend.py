"""The interface a grammar backend implements, and the choice of backend.

A backend turns a `StructuredOutputs` spec into a compiled grammar (the slow part, run on a thread),
makes a matcher per request from it, and fills the bitmask rows of a batch of matchers at once.
Bitmasks are int32 rows of ceil(vocab/32) words, bit j of word i allowing token 32*i+j: the layout
both xgrammar and llguidance write, so the sampler needs to know nothing about the backend.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from ..messages import StructuredOutputs

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def constraint_of(spec: StructuredOutputs) -> tuple[str, Any]:
    """(kind, value) of the one constraint set in `spec`; ValueError unless exactly one is."""
    set_ = [k for k in KINDS if getattr(spec, k) not in (None, False)]
    if len(set_) != 1:
        raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, grammar; "
                         f"got {', '.join(set_) or 'none'}")
    kind = set_[0]
    value = getattr(spec, kind)
    if kind == "json":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
    elif kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
    elif not value:
        raise ValueError(f"structured_outputs.{kind} is empty")
    return kind, value


class Matcher:
    """One request's position in its grammar."""

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it."""
        raise NotImplementedError

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError

    def is_terminated(self) -> bool:
        """The grammar has ended (a stop token was accepted)."""
        raise NotImplementedError


class GrammarBackend:
    name: ClassVar[str] = ""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        """`tokenizer` is the model's Hugging Face tokenizer; `vocab_size` the width of the model's
        logits (it may exceed the tokenizer's); EOS is allowed only where the grammar accepts."""
        raise NotImplementedError

    @staticmethod
    def check_spec(kind: str, value) -> None:
        """Fast check (no tokenizer, no compile) that raises ValueError naming what is unsupported or
        invalid; it runs in EngineCore.validate, so the server answers 400 before anything is queued."""
        raise NotImplementedError

    def compile(self, kind: str, value) -> Any:
        """The compiled grammar (slow: runs on the compile thread). Raises ValueError when invalid."""
        raise NotImplementedError

    def matcher(self, compiled) -> Matcher:
        raise NotImplementedError

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        """Write row i of the CPU int32 `bitmask` from matchers[i]."""
        raise NotImplementedError


BACKENDS = ("auto", "xgrammar", "guidance")
# Chosen by measurement on the batched path (BENCHMARKS.md, "Structured outputs"):
AUTO_BACKEND = "guidance"


def backend_class(name: str) -> type[GrammarBackend]:
    if name == "auto":
        name = AUTO_BACKEND
    if name == "xgrammar":
        from .xgrammar_backend import XGrammarBackend as cls
    elif name == "guidance":
        from .guidance_backend import GuidanceBackend as cls
    else:
        raise ValueError(f"unknown structured outputs backend {name!r}; choose {', '.join(BACKENDS)}")
    return cls


def make_backend(name: str, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> GrammarBackend:
    return backend_class(name)(tokenizer, vocab_size, eos_token_ids)
