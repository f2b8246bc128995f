"""xgrammar: grammars compiled ahead of time into a per-state token mask cache (slow to compile,
fast masks); a batch's masks are filled by its thread pool."""

from __future__ import annotations

import json
import re

import torch
import xgrammar as xgr

from .backend import GrammarBackend, Matcher

# Compact JSON: with free whitespace a weak model can emit blanks forever and never close the object.
JSON_OPTIONS = dict(any_whitespace=False, separators=(",", ":"))  # as llguidance writes it


class XGrammarMatcher(Matcher):
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.m = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return self.m.accept_token(token)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.m.is_terminated()


def _is_ebnf(text: str) -> bool:
    return "::=" in text  # GBNF-style rules; otherwise the text is Lark


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# What xgrammar 0.2.9 accepts in a JSON schema without enforcing it (found by probing: a violating
# document passes its matcher). Refused by name, so a schema is never silently loosened.
IGNORED_KEYWORDS = ("contains", "not", "if", "then", "else")
FORMATS = frozenset(("email", "date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6", "hostname",
                     "uri", "uri-reference", "json-pointer"))
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def unenforced_feature(schema) -> str | None:
    """The first feature of `schema` that xgrammar would silently ignore, described, or None."""
    if not isinstance(schema, dict):
        return None
    for key in IGNORED_KEYWORDS:
        if key in schema:
            return f"keyword {key!r}"
    fmt = schema.get("format")
    if fmt is not None and fmt not in FORMATS:
        return f"format {fmt!r}"
    if fmt is not None and ("minLength" in schema or "maxLength" in schema):
        return "format combined with minLength/maxLength"
    if len(schema.get("allOf") or ()) > 1:
        return "allOf with more than one schema"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"$ref to another document ({ref})"
    subschemas = [schema.get(k) for k in SCHEMA_ONE]
    subschemas += [s for k in SCHEMA_MAPS for s in (schema.get(k) or {}).values()]
    subschemas += [s for k in SCHEMA_LISTS for s in (schema.get(k) or [])]
    return next((found for s in subschemas if (found := unenforced_feature(s))), None)


# xgrammar 0.2.9 writes the characters of a length-bounded string (minLength/maxLength) as this class,
# which lets raw control characters through: invalid JSON. Ours excludes them, as its unbounded strings do.
BOUNDED_STRING_CHAR, JSON_STRING_CHAR = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'
# A negated class ([^...]) in xgrammar 0.2.9 also matches the UTF-8 encoding of a surrogate (U+D800 to
# U+DFFF, e.g. bytes ED A0 80), which is not valid UTF-8: a byte-level tokenizer can then emit text
# that decodes to replacement characters, longer than the grammar counted. So every negated class
# outside a quoted literal gets the surrogates added to what it excludes.
_LITERAL_OR_NEGATED_CLASS = re.compile(r'"(?:\\.|[^"\\])*"|\[\^((?:\\.|[^\]\\])*)\]')


def _utf8_only(ebnf: str) -> xgr.Grammar:
    """The grammar of this EBNF text, its negated classes excluding the surrogates."""
    def exclude_surrogates(m: re.Match) -> str:
        return m.group(0) if m.group(1) is None else "[^" + m.group(1) + r"\uD800-\uDFFF]"
    return xgr.Grammar.from_ebnf(_LITERAL_OR_NEGATED_CLASS.sub(exclude_surrogates, ebnf))


def _json_grammar(schema: str) -> xgr.Grammar:
    ebnf = str(xgr.Grammar.from_json_schema(schema, **JSON_OPTIONS))
    return _utf8_only(ebnf.replace(BOUNDED_STRING_CHAR, JSON_STRING_CHAR))


def _grammar(kind: str, value) -> xgr.Grammar:
    if kind == "json" and (feature := unenforced_feature(json.loads(value))):
        raise ValueError(f"structured_outputs.json uses {feature}, which the xgrammar backend does not support "
                         "(--structured-outputs-backend guidance may)")
    try:
        if kind == "json":
            return _json_grammar(value)
        if kind == "json_object":
            return _json_grammar('{"type": "object"}')
        if kind == "regex":
            return _utf8_only(str(xgr.Grammar.from_regex(value)))
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(value))
        return _utf8_only(str(xgr.Grammar.from_ebnf(value) if _is_ebnf(value) else xgr.Grammar.from_lark(value)))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses alike
        raise ValueError(f"structured_outputs.{kind} is not supported by xgrammar: {_first_line(e)}") from None


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids) or None)
        # One compile thread: compiles already run beside the step loop, on a machine it shares.
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()

    @staticmethod
    def check_spec(kind: str, value) -> None:
        _grammar(kind, value)

    def compile(self, kind: str, value) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(_grammar(kind, value))

    def matcher(self, compiled) -> Matcher:
        return XGrammarMatcher(compiled)

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask([m.m for m in matchers], bitmask)


def _first_line(e: Exception) -> str:
    """The message without xgrammar's "[hh:mm:ss] /path/file.cc:123: " prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", line)
