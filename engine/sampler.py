"""Token sampling on the device for a whole batch: penalties, logit bias, allowed-token masks
(structured outputs), temperature, top-k/top-p/min-p, per-request seeds, logprobs. Inputs go up with
non-blocking copies; one host synchronisation per step, at the end."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .messages import SamplingParams

_MASK = 2**63 - 1


def to_device(values, device: torch.device, dtype=None) -> torch.Tensor:
    """Host values on the device without blocking the host: through pinned memory on CUDA."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list:
    """Device tensors as host lists, after a single synchronisation (the step's only one)."""
    if tensors and tensors[0].device.type == "cuda":
        copies = [t.to("cpu", non_blocking=True) for t in tensors]
        torch.cuda.current_stream(tensors[0].device).synchronize()
        tensors = copies
    return [t.tolist() for t in tensors]


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()
    bitmask: torch.Tensor | None = None  # CPU int32 words, bit j of word i allows token 32*i+j

    def banned_tokens(self) -> list[int]:
        """Tokens that would end the request before `min_tokens` outputs: masked out, as vLLM does."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return []
        eos = [] if self.params.ignore_eos else list(self.eos_token_ids)
        return eos + list(self.params.stop_token_ids)


class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step."""

    def __init__(self, rows: list[SamplingRow], device: torch.device):
        self.rows = rows
        self.device = device
        params = [r.params for r in rows]
        self.all_greedy = all(p.greedy for p in params)
        if not self.all_greedy:  # a greedy batch needs none of these: the argmax alone
            self.temperature = to_device([p.temperature if not p.greedy else 1.0 for p in params], device,
                                         torch.float32)
            self.greedy_mask = to_device([p.greedy for p in params], device)
            top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
            self.top_k = to_device(top_k, device) if any(top_k) else None
            self.top_p = to_device([p.top_p for p in params], device) if any(p.top_p < 1.0 for p in params) else None
            self.min_p = to_device([p.min_p for p in params], device) if any(p.min_p > 0.0 for p in params) else None
        self.has_penalties = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                                 for p in params)
        self.max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        self.banned = [(i, r.banned_tokens()) for i, r in enumerate(rows)]
        self.banned = [(i, b) for i, b in self.banned if b]
        self.logit_bias = [(i, list(p.logit_bias), list(p.logit_bias.values()))
                           for i, p in enumerate(params) if p.logit_bias]
        self.bitmask = None
        masked = [i for i, r in enumerate(rows) if r.bitmask is not None]
        if masked:
            words = torch.full((len(rows), rows[masked[0]].bitmask.shape[0]), -1, dtype=torch.int32)
            for i in masked:
                words[i] = rows[i].bitmask
            self.bitmask = words.to(device)

    def forbidden(self, vocab: int) -> torch.Tensor:
        """[N, vocab] bool from the bitmask words (rows without a constraint forbid nothing)."""
        bits = 1 << torch.arange(32, dtype=torch.int32, device=self.device)
        return ((self.bitmask[:, :, None] & bits) == 0).reshape(len(self.rows), -1)[:, :vocab]

    def _token_counts(self, vocab: int, which: str) -> torch.Tensor:
        """[N, vocab] counts of each row's output (or prompt+output) tokens."""
        seqs = [r.output_token_ids if which == "output" else r.prompt_token_ids + r.output_token_ids
                for r in self.rows]
        width = max((len(s) for s in seqs), default=0)
        counts = torch.zeros(len(seqs), vocab + 1, device=self.device)
        if width:
            padded = to_device([s + [vocab] * (width - len(s)) for s in seqs], self.device,
                               torch.int64)  # pad into a spare column
            counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        return counts[:, :vocab]

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[1]
        params = [r.params for r in self.rows]
        # Which penalties apply is decided on the host: a device-side test would cost a sync.
        rep = to_device([p.repetition_penalty for p in params], self.device)[:, None]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._token_counts(vocab, "all") > 0
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            freq = to_device([p.frequency_penalty for p in params], self.device)[:, None]
            presence = to_device([p.presence_penalty for p in params], self.device)[:, None]
            counts = self._token_counts(vocab, "output")
            logits = logits - freq * counts - presence * (counts > 0).float()
        return logits

    def uniforms(self) -> torch.Tensor:
        """One U[0, 1) draw per row (float64, shape [rows, 1]); seeded rows draw theirs from a generator
        keyed by (seed, output index), so the same request yields the same tokens whatever else is in the
        batch."""
        u = torch.rand(len(self.rows), 1, dtype=torch.float64, device=self.device)
        for i, row in enumerate(self.rows):
            seed = row.params.seed
            if seed is not None and not row.params.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(hash((seed, len(row.output_token_ids))) & _MASK)
                u[i] = torch.rand(1, dtype=torch.float64, device=self.device, generator=gen)
        return u


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's token by inverse CDF: the first whose cumulative probability exceeds u times the row's
    total (rows need not be normalised; a token of probability 0 is never drawn, since the cumulative sum
    does not rise there and u < 1). One cumulative sum over the vocabulary: the Gumbel-max way, Exp(1)
    noise for every token, cost 20 ms for 32 rows of a 32k vocabulary on one CPU core, this 1 ms. Float64,
    so that u times the total stays below the last cumulative value."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (logprob of the sampled token, top ids, top logprobs) when the row asked for logprobs.
    logprobs: list[tuple[float, list[int], list[float]] | None]


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
    if batch.has_penalties:
        logits = batch.apply_penalties(logits)
    if batch.banned or batch.logit_bias:
        logits = logits.clone()
        for i, tokens, bias in batch.logit_bias:
            logits[i, tokens] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if batch.banned:
            rows = [i for i, tokens in batch.banned for _ in tokens]
            cols = [t for _, tokens in batch.banned for t in tokens]
            logits[to_device(rows, batch.device), to_device(cols, batch.device)] = float("-inf")
    if batch.bitmask is not None:  # after the bias: no bias can bring back a token the grammar forbids
        logits = logits.masked_fill(batch.forbidden(logits.shape[1]), float("-inf"))
    tokens = logits.argmax(dim=-1)
    if not batch.all_greedy:
        scaled = logits / batch.temperature[:, None]
        if batch.top_k is not None:
            k = torch.where(batch.top_k > 0, batch.top_k, scaled.shape[1]).clamp(max=scaled.shape[1])
            kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        if batch.top_p is not None:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= batch.top_p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if batch.min_p is not None:
            threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        sampled = draw(probs, batch.uniforms())
        tokens = torch.where(batch.greedy_mask, tokens, sampled)
    logprobs: list = [None] * len(batch.rows)
    if raw_logprobs is None:
        return SamplerOutput(to_host(tokens)[0], logprobs)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top_vals, top_ids = raw_logprobs.topk(max(batch.max_logprobs, 1), dim=-1)
    token_ids, chosen, top_vals, top_ids = to_host(tokens, chosen, top_vals, top_ids)
    for i, row in enumerate(batch.rows):
        k = row.params.logprobs
        if k is not None:
            logprobs[i] = (chosen[i], top_ids[i][:k], top_vals[i][:k])
    return SamplerOutput(token_ids, logprobs)


def prompt_logprobs(logits: torch.Tensor, next_tokens: torch.Tensor, k: int):
    """Logprob of each next prompt token under the logits before it, with the top-k alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, next_tokens[:, None]).squeeze(1)
    if k > 0:
        vals, ids = lp.topk(k, dim=-1)
        chosen, vals, ids = to_host(chosen, vals, ids)
    else:
        chosen, = to_host(chosen)
        vals = ids = [[] for _ in chosen]
    return list(zip(chosen, ids, vals))
