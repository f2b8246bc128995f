"""llguidance: grammars are checked, not precompiled; each step's masks are computed lazily from the
lexer and parser state, in parallel over the batch by its executor."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import torch

from .backend import GrammarBackend, Matcher

# Compact JSON (llguidance's default is already rigid whitespace; said here so it stays so), and no
# keyword silently dropped: an unsupported one is an error that names it.
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


class GuidanceMatcher(Matcher):
    def __init__(self, m: llguidance.LLMatcher):
        self.m = m

    def accept(self, token: int) -> bool:
        return self.m.consume_token(token)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()


def _grammar(kind: str, value) -> str:
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(value, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.grammar_from("regex", value)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(value))
    return llguidance.grammar_from("grammar", value)  # Lark, or GBNF/EBNF converted to Lark


def _checked(kind: str, value) -> str:
    try:
        grammar = _grammar(kind, value)
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from None
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise ValueError(f"structured_outputs.{kind} is not supported by llguidance: {messages[0]}")
    return grammar


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=sorted(eos_token_ids) or None)
        self.executor = llguidance.LLExecutor()

    @staticmethod
    def check_spec(kind: str, value) -> None:
        _checked(kind, value)

    def compile(self, kind: str, value) -> llguidance.LLMatcher:
        """A matcher in its start state (building it builds the lexer and parser); requests copy it."""
        m = llguidance.LLMatcher(self.tokenizer, _checked(kind, value), log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs.{kind} is not supported by llguidance: {m.get_error()}")
        return m

    def matcher(self, compiled: llguidance.LLMatcher) -> Matcher:
        return GuidanceMatcher(compiled.deep_copy())

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing llguidance.torch
        # (its torch.compile decorator pulls in torch._dynamo: seconds of import).
        assert bitmask.dtype == torch.int32 and bitmask.is_cpu and bitmask.is_contiguous()
        self.executor.unsafe_compute_mask_ptr([(m.m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])
