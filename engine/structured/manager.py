"""Grammars for the engine: compiled on a thread with a cache, one matcher per constrained request,
a bitmask row per constrained sampling row each step.

The step loop never waits on a compile: a constrained request stays here until its grammar is ready
and only then joins the scheduler (which so never sees a request it could not constrain).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import msgspec
import torch

from scheduling import Request

from ..messages import StructuredOutputs
from .backend import GrammarBackend, Matcher, backend_class, constraint_of


@dataclass
class RequestGrammar:
    """A request's matcher, kept in step with its output tokens."""
    matcher: Matcher
    start_after: list[int] | None  # the constraint begins after these tokens appear in the output
    start: int | None = None  # output index where the constraint begins, once known
    next_end: int = 0  # where the search for `start_after` resumes
    consumed: int = 0  # output tokens from `start` on that the matcher has taken

    def __post_init__(self) -> None:
        if not self.start_after:
            self.start = 0
        else:
            self.next_end = len(self.start_after)

    def sync(self, output: list[int]) -> bool:
        """Bring the matcher to the end of `output`: accept what it has not seen, roll back what is no
        longer there. False if the grammar rejects a token."""
        if self.start is not None and len(output) < self.start:  # shrank to before the constraint began
            self.matcher.rollback(self.consumed)
            self.start, self.consumed, self.next_end = None, 0, len(self.start_after)
        if self.start is None:
            k = len(self.start_after)
            for end in range(self.next_end, len(output) + 1):
                if output[end - k:end] == self.start_after:
                    self.start = end
                    break
            else:
                self.next_end = max(len(output) + 1, k)
                return True
        target = len(output) - self.start
        if self.consumed > target:
            self.matcher.rollback(self.consumed - target)
            self.consumed = target
        for token in output[self.start + self.consumed:]:
            if not self.matcher.accept(token):
                return False
            self.consumed += 1
        return True

    @property
    def active(self) -> bool:
        """Whether the next token is constrained. (Also once the grammar cannot go on: then its mask
        allows only EOS.)"""
        return self.start is not None


class StructuredOutputManager:
    CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first

    def __init__(self, backend: str, load_tokenizer: Callable, vocab_size: int, eos_token_ids: frozenset[int]):
        """`backend` is a name from BACKENDS; `load_tokenizer()` gives the model's HF tokenizer."""
        self.backend_name = backend
        # Built on the compile thread: loading the tokenizer and indexing its vocabulary take seconds.
        self.backend: GrammarBackend | None = None
        self._backend_args = (load_tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        # One thread: compiles queue behind each other rather than compete with the step for cores.
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.mask_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self.cache: OrderedDict[bytes, cf.Future] = OrderedDict()
        self.pending: dict[str, tuple[Request, StructuredOutputs, cf.Future]] = {}
        self.grammars: dict[str, RequestGrammar] = {}

    def check(self, spec: StructuredOutputs) -> None:
        """Raise ValueError naming what is invalid or unsupported (cheap: no compile)."""
        kind, value = constraint_of(spec)
        backend_class(self.backend_name).check_spec(kind, value)
        if spec.start_after is not None and any(t < 0 or t >= self.vocab_size for t in spec.start_after):
            raise ValueError(f"structured_outputs.start_after token ids must be in [0, {self.vocab_size})")

    # ---- requests waiting for their grammar ------------------------------------------------------
    def submit(self, request: Request, spec: StructuredOutputs) -> None:
        kind, value = constraint_of(spec)
        key = msgspec.msgpack.encode((kind, value))
        future = self.cache.get(key)
        if future is None:
            future = self.cache[key] = self.pool.submit(self._compile, kind, value)
            if len(self.cache) > self.CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        self.pending[request.request_id] = (request, spec, future)

    def _compile(self, kind: str, value):
        if self.backend is None:
            load_tokenizer, vocab_size, eos_token_ids = self._backend_args
            self.backend = backend_class(self.backend_name)(load_tokenizer(), vocab_size, eos_token_ids)
        return self.backend.compile(kind, value)

    def ready(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """Requests whose grammar is now compiled (each with its matcher made), and those whose
        compile failed, with the error."""
        ready, failed = [], []
        for rid, (request, spec, future) in list(self.pending.items()):
            if not future.done():
                continue
            del self.pending[rid]
            try:
                compiled = future.result()
                self.grammars[rid] = RequestGrammar(self.backend.matcher(compiled), spec.start_after)
                ready.append(request)
            except Exception as e:  # noqa: BLE001 - a grammar the backend cannot build fails its request only
                failed.append((request, f"structured outputs: {type(e).__name__}: {e}"))
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until a pending compile finishes or `timeout` passes (the engine has nothing else to do)."""
        cf.wait([f for _, _, f in self.pending.values()], timeout, return_when=cf.FIRST_COMPLETED)

    def abort(self, request_id: str) -> Request | None:
        self.grammars.pop(request_id, None)
        entry = self.pending.pop(request_id, None)
        return None if entry is None else entry[0]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.pending

    # ---- the step --------------------------------------------------------------------------------
    def bitmasks(self, requests: list[Request]) -> cf.Future | None:
        """Bitmask rows (CPU int32, by request id) for those of `requests` whose next token is
        constrained, filled on a thread so that the fill overlaps the model's forward pass (the masks
        depend only on tokens already sampled). None when no row is constrained."""
        rows = [(r.request_id, g.matcher) for r in requests
                if (g := self.grammars.get(r.request_id)) is not None and g.active]
        return self.mask_pool.submit(self._fill, rows) if rows else None

    def _fill(self, rows: list[tuple[str, Matcher]]) -> dict[str, torch.Tensor]:
        bitmask = torch.full((len(rows), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.backend.fill_bitmask([m for _, m in rows], bitmask)
        return {rid: bitmask[i] for i, (rid, _) in enumerate(rows)}

    def advance(self, requests: list[Request]) -> list[Request]:
        """Move the matchers of `requests` to their outputs; drop those of finished requests.
        Returns the requests whose new token the grammar rejected."""
        rejected = []
        for r in requests:
            g = self.grammars.get(r.request_id)
            if g is None:
                continue
            if r.is_finished:
                del self.grammars[r.request_id]
            elif not g.sync(r.output_token_ids):
                rejected.append(r)
        return rejected
