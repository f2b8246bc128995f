"""Prompts of a requested token length.

Completions get token-id prompts (`"prompt": [ids]`), which the server uses as they are, so their
length is exact. Chat needs text: random words, as many as the tokenizer's measured tokens-per-word
says, so its length is close rather than exact (the chat template adds tokens anyway); the true count
comes back in the server's usage and is what the report records.

Ids and words are drawn at random for each request, seeded by (seed, index): prompts share no prefix
that a prefix cache could reuse, and a rerun with the same seed sends the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import numpy as np

from loadgen.workload import WorkloadRequest

WORDS = (
    "the of and to in is was that for on as with by at from his her they be this which are or an had not "
    "but one all were their been has have when who would there more will also into other some time about "
    "after over first new two may could only than then these its people made most years such state "
    "during world between many under where city while river music school house power water light "
    "story market garden window mountain engine signal planet letter number history summer winter "
    "morning evening station village animal forest ocean bridge company country doctor teacher family"
).split()
# Tokens per English word of a typical BPE vocabulary, for when no tokenizer is at hand.
TOKENS_PER_WORD_GUESS = 1.3
_PROBE_WORDS = 2000


@dataclass(frozen=True)
class Vocabulary:
    """What prompt building needs to know of the server's tokenizer."""

    source: str  # "server", "local" or "none"
    token_pool: np.ndarray | None  # ordinary (non-special) token ids to draw prompts from
    tokens_per_word: float
    max_model_len: int | None = None


def load_local_tokenizer(path: str):
    from transformers import AutoTokenizer  # heavy; only when a local tokenizer is asked for

    return AutoTokenizer.from_pretrained(path)


async def probe_vocabulary(
    http: httpx.AsyncClient, server_root: str, model: str, tokenizer_dir: str | None
) -> Vocabulary:
    """Tokenize a text of random words with the server's /tokenize, else the local tokenizer."""
    rng = np.random.default_rng(12345)
    text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), _PROBE_WORDS))
    try:
        response = await http.post(f"{server_root}/tokenize", json={"model": model, "prompt": text})
        if response.status_code == 200:
            body = response.json()
            return _vocabulary("server", body["tokens"], body.get("max_model_len"))
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    if tokenizer_dir:
        tok = load_local_tokenizer(tokenizer_dir)
        return _vocabulary("local", tok.encode(text, add_special_tokens=False), None)
    return Vocabulary("none", None, TOKENS_PER_WORD_GUESS)


def _vocabulary(source: str, ids: list[int], max_model_len: int | None) -> Vocabulary:
    # A BOS/EOS the tokenizer may add sits at either end; dropping both ends keeps specials out.
    ordinary = ids[1:-1]
    if not ordinary:
        return Vocabulary("none", None, TOKENS_PER_WORD_GUESS, max_model_len)
    return Vocabulary(source, np.unique(ordinary), len(ordinary) / _PROBE_WORDS, max_model_len)


@dataclass(frozen=True)
class PromptMaker:
    vocabulary: Vocabulary
    token_ids: bool  # completions with a known vocabulary: exact-length id prompts
    seed: int

    def __call__(self, index: int, request: WorkloadRequest) -> str | list[int]:
        if request.prompt is not None:
            return request.prompt
        rng = np.random.default_rng([self.seed, 2, index])
        if self.token_ids:
            pool = self.vocabulary.token_pool
            return pool[rng.integers(0, pool.size, request.input_tokens)].tolist()
        words = max(1, round(request.input_tokens / self.vocabulary.tokens_per_word))
        return " ".join([WORDS[i] for i in rng.integers(0, len(WORDS), words)])
