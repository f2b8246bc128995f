"""How many tokens a request is expected to generate: the one rule that every length-predicting
policy uses, engine-level (LARRY, SCLS) and balancer-level (SAL, the SCLS offloader), in the engine
and in the simulator alike.

`--output-length` names what the system is allowed to know:
- `oracle`: the client declares each request's true output length as its `max_tokens` (the
  simulator sends the trace's length; a live benchmark does the same with `ignore_eos`). The
  expectation is `max_tokens`. Only a run that sends true lengths may claim this mode.
- `max-tokens`: `max_tokens` is a limit, not a length (the simulator sends the workload's longest
  output for every request); the expectation is still `max_tokens`, the worst case.
- `history`: the running mean of the output lengths of finished requests whose prompt fell in the
  same prompt-length bucket (`PRIOR` until one has), capped by `max_tokens`.
In every mode an `ignore_eos` request is expected to run to `max_tokens`: that is not a prediction
but what the request says it will do.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

MODES = ("oracle", "max-tokens", "history")
PRIOR = 128.0  # expected output before any request in the bucket has finished
BUCKET_EDGES = (256, 1024, 4096)  # prompt-length bucket boundaries, in tokens


def bucket(prompt_tokens: int) -> int:
    return bisect_right(BUCKET_EDGES, prompt_tokens)


def bucket_label(index: int) -> str:
    """`[lo, hi)` in tokens, e.g. '256-1024'; the last bucket is open: '4096+'."""
    lo = BUCKET_EDGES[index - 1] if index else 0
    return f"{lo}-{BUCKET_EDGES[index]}" if index < len(BUCKET_EDGES) else f"{lo}+"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown output-length mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


@dataclass
class OutputLengths:
    """The expectation and, for `history`, what it learned. Workers send a copy in each load
    report, so the balancer predicts with the same rule and the same numbers."""
    mode: str = "history"
    means: list[float] = field(default_factory=lambda: [PRIOR] * (len(BUCKET_EDGES) + 1))
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKET_EDGES) + 1))

    def __post_init__(self) -> None:
        check_mode(self.mode)

    def expected(self, prompt_tokens: int, max_tokens: int, ignore_eos: bool) -> float:
        if ignore_eos or self.mode != "history":
            return float(max_tokens)
        return min(float(max_tokens), self.means[bucket(prompt_tokens)])

    def observe(self, prompt_tokens: int, output_tokens: int) -> None:
        b = bucket(prompt_tokens)
        self.counts[b] += 1
        self.means[b] += (output_tokens - self.means[b]) / self.counts[b]

    @property
    def mean(self) -> float:
        """Mean over every finished request (PRIOR before the first)."""
        n = sum(self.counts)
        return sum(m * c for m, c in zip(self.means, self.counts)) / n if n else PRIOR

    def copy(self) -> OutputLengths:
        return OutputLengths(self.mode, list(self.means), list(self.counts))
