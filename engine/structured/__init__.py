"""Structured outputs: each constrained request gets a grammar, compiled off the step loop, and a
matcher that yields a token bitmask per step. Backends: xgrammar and llguidance, one file each."""

from .backend import BACKENDS, GrammarBackend, Matcher, backend_class, constraint_of, make_backend
from .manager import StructuredOutputManager

__all__ = ["BACKENDS", "GrammarBackend", "Matcher", "StructuredOutputManager", "backend_class", "constraint_of",
           "make_backend"]
