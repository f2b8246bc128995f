"""The step-time model the simulator runs on, its presets, and `python -m loadgen simulate fit`.

A step's time, on the features scheduling/step_cost.py counts (T tokens, S sequences, K context
tokens read, P query-key pairs):

    memory  = weights_s + c3*K           weights streamed once per step, plus each chunk's KV read
    compute = c1*T + c4*P                matmul FLOPs per token, attention FLOPs per pair
    step    = c0 + c2*S + memory + compute - overlap*min(memory, compute)

`overlap` 1 is the roofline's max(memory, compute) (a GPU streams weights while it multiplies), 0
their sum (a CPU mostly does one then the other); the fit chooses it. c0 is the per-step fixed cost
(launches, scheduling, sampling), c2 the per-sequence cost. The design's linear
model `StepModel(c0, c1, c2, c3)` is the special case weights_s = c4 = overlap = 0.

Four more terms are the process around the step, which the simulator and `loadgen replay` apply:
`loop_s`, the worker loop's own time between two steps while work remains (sending the outputs
and the load report, taking in new requests); `request_s`, from the client's send until an idle
worker holds the request (HTTP, validation, tokenization, the server's queue, the balancer); and
`first_token_s` / `token_s`, from the end of the step that made a request's first / last token to
the client reading it (queues, detokenization, SSE; the first chunk also starts the response, and
the last one ends the stream). The fit takes each from the server's own timestamps: its mean, and
its spread (percentiles), which the replay draws from per request, as it draws each step's time.

A step's time spreads two ways, fitted apart: the machine's speed over a window of wall time
(`speed_window_s`, SPEED_WINDOW_S unless `simulate fit --speed-window-s` says otherwise;
`speed_spread`: every worker's steps in a window over the model's prediction for them, and
`speed_correlation`: how much of one window's speed carries into the next; the simulator draws one
factor per window for all workers, so a slow stretch slows every step of the requests it holds, for
as long as such stretches last) and each step about its window (`step_spread`).

`simulate fit --step-log DIR --results RUN_DIR [--results RUN_DIR ...] --output MODEL.json` fits
the step terms by least squares on the workers' step logs (engine/step_log.py) of those runs and
the server's terms on the runs' own timestamps (the open-loop runs', if any), prints each coefficient with its standard error and
the relative error on held-out steps (every fifth), and writes the file `--step-model` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen.args import positive_float
from scheduling.step_cost import StepFeatures

STEP_TERMS = ("c0", "c2", "weights_s", "c3", "c1", "c4")  # the fitted columns, in the order fit() solves them
SERVER_PATH = ("request", "first_token", "token")  # each a mean (request_s, ...) and a spread (request_spread, ...)
OVERLAP_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
HOLDOUT_EVERY = 5  # every fifth step is held out of the fit and scored
# The quantiles a fit records of each spread: the middle of each percentile, so that one stall in a
# log (the slowest step of thousands) stands for the top half percent, not for the whole top percent.
# Drawing from them (flat beyond the ends) averages exactly their mean.
SPREAD = (np.arange(100) + 0.5) / 100
# The machine's speed is fitted and drawn per window of this much wall time (by default). On this
# repository's 2-core machine the same steps ran up to 20% faster or slower from one window to the next,
# on both workers at once and not with the load: per 0.5 s, a standard deviation of 8-16% about the
# model, each window correlated 0.35-0.8 with the next (BENCHMARKS.md, "Simulator against the live
# server"). Windows of 2 s drawn independently missed the stretches shorter than a request's decode:
# the replays' p99 TPOT and E2E were 1-3 points further off.
SPEED_WINDOW_S = 0.5
MIN_WINDOW_STEPS = 10  # a window with fewer steps (the gaps between runs) gives no speed
NORMAL = statistics.NormalDist()


@dataclass(frozen=True)
class StepModel:
    c0: float  # seconds per step: fixed cost
    c1: float  # per batched token: matmul FLOPs
    c2: float  # per scheduled sequence
    c3: float  # per KV token read: attention reads
    c4: float = 0.0  # per query-key pair: attention FLOPs
    weights_s: float = 0.0  # weights streamed once per step
    overlap: float = 0.0  # 0: memory and compute add up; 1: max(memory, compute)
    loop_s: float = 0.0  # the worker loop between two steps while work remains
    request_s: float = 0.0  # server path per request: client send to an idle worker holding it
    first_token_s: float = 0.0  # server path of a first token: step end to the client's chunk
    token_s: float = 0.0  # server path of a last token: step end to the client's end of stream
    # The window the machine's speed was fitted over (and is drawn per), and the correlation of one
    # window's speed with the next's, as normal scores (0: independent windows): how long a slow
    # stretch lasts, which is what a queue feels.
    speed_window_s: float = SPEED_WINDOW_S
    speed_correlation: float = 0.0
    # How the measured times spread around those means, as their quantiles at SPREAD: each step's
    # measured over predicted time (scaled to mean 1), and each request's server path times. A
    # queue waits on the spread as well as on the mean. Empty: every step and request costs the mean.
    step_spread: tuple[float, ...] = ()
    # The machine's speed, one factor per speed_window_s of wall time shared by every worker's steps in it
    # (mean 1): a slow stretch slows every step of the requests it holds, which per-step draws average out.
    speed_spread: tuple[float, ...] = ()
    request_spread: tuple[float, ...] = ()
    first_token_spread: tuple[float, ...] = ()
    token_spread: tuple[float, ...] = ()

    def __post_init__(self):
        values = [v for v in dataclasses.astuple(self) if isinstance(v, float)]
        values += [v for f in SPREADS for v in getattr(self, f)]
        if (min(values) < 0 or not all(map(math.isfinite, values)) or self.overlap > 1
                or self.speed_correlation >= 1 or self.speed_window_s <= 0):
            raise ValueError(f"step model coefficients must be finite and >= 0, overlap <= 1, "
                             f"speed_correlation < 1, speed_window_s > 0: {self}")
        if any(len(getattr(self, f)) not in (0, len(SPREAD)) for f in SPREADS):
            raise ValueError(f"a spread has {len(SPREAD)} quantiles (or none)")
        if self.c0 + self.c1 + self.c2 + self.weights_s <= 0:  # every step has a sequence and a token
            raise ValueError(f"step model gives steps no time: {self}")

    def step_seconds(self, f: StepFeatures) -> float:
        memory = self.weights_s + self.c3 * f.kv_tokens_read
        compute = self.c1 * f.batched_tokens + self.c4 * f.attention_pairs
        return self.c0 + self.c2 * f.num_seqs + memory + compute - self.overlap * min(memory, compute)

    def draw(self, term: str, rng: np.random.Generator) -> float:
        """One sample of `term` ("step", "speed": factors on a step's time; "request", "first_token",
        "token": a server path time) from its spread; without one, its mean."""
        # No draw without a spread: a model of means leaves the generator's sequence as it was.
        return self.quantile(term, rng.random() if getattr(self, f"{term}_spread") else 0.5)

    def quantile(self, term: str, q: float) -> float:
        """`term`'s quantile q (0-1) of its spread; without one, its mean."""
        spread = getattr(self, f"{term}_spread")
        if not spread:
            return 1.0 if term in ("step", "speed") else getattr(self, f"{term}_s")
        return float(np.interp(q, SPREAD, spread))

    def at_speed(self, factor: float) -> StepModel:
        """This model on a machine whose steps take `factor` times as long: the step terms, the worker
        loop and the server path (its means and its spreads, in seconds) scaled, for the server's CPU
        work drifts with the machine as the steps do; the factors' spreads as they are."""
        scaled = {term: getattr(self, term) * factor for term in (*STEP_TERMS, "loop_s")}
        for part in SERVER_PATH:
            scaled[f"{part}_s"] = getattr(self, f"{part}_s") * factor
            scaled[f"{part}_spread"] = tuple(v * factor for v in getattr(self, f"{part}_spread"))
        return dataclasses.replace(self, **scaled)

    @classmethod
    def load(cls, path: str | Path) -> StepModel:
        """A JSON object with at least c0..c3 (what `simulate fit` writes, or hand-written)."""
        coef = json.loads(Path(path).read_text())
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(coef, dict) or not {"c0", "c1", "c2", "c3"} <= coef.keys():
            raise ValueError(f"{path}: expected a JSON object with c0, c1, c2, c3 (and optionally "
                             f"{', '.join(names[4:])})")
        return cls(**{k: tuple(map(float, coef[k])) if k in SPREADS else float(coef[k])
                      for k in names if k in coef})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SPREADS = tuple(f.name for f in dataclasses.fields(StepModel) if f.name.endswith("_spread"))


def spread_of(samples) -> tuple[float, ...]:
    return tuple(float(q) for q in np.quantile(np.asarray(samples, dtype=np.float64), SPREAD))


# ---- presets ----------------------------------------------------------------------------------------
def h100_llama3_8b() -> tuple[StepModel, int, int]:
    """An H100 80GB serving a Llama-3.1-8B-shaped bf16 model, from the anchors of design.md §5: the
    step model, the KV tokens per worker and the context length.

    - weights_s = 15.0 GB / 3.0 TB/s = 5.0 ms: the weights read every step (embedding rows are only
      gathered, so 15.0 of the 16.06 GB).
    - c3 = 131072 B / 3.0 TB/s = 43.7 ns per KV token read.
    - c1 = 2 * 7.5e9 FLOP / 800 TFLOP/s = 18.75 µs per token: the matmuls at the measured peak.
    - c4 = 4 * 4096 * 32 FLOP / 800 TFLOP/s = 0.655 ps per query-key pair (QK^T and PV over every
      head of every layer): a 512-token chunk at 8k context is 4.3M pairs, 2.8 ms.
    - overlap = 1: per phase the step costs the larger of memory and compute, as a roofline.
    - c0 and c2 from the measured cuBLAS step times under one CUDA graph, before attention: 6.1 ms at
      batch 1, 6.4 at 32 and 8.5 at 256, all memory-bound (compute is 4.8 ms at 256). So
      c0 + c2 = 1.1 ms and c0 + 256*c2 = 3.5 ms: c2 = 9.4 µs per sequence (the matmuls' efficiency
      falling from 82% to 59% of the bandwidth bound as the batch grows), c0 = 1.09 ms; batch 32
      then costs 6.39 ms against 6.4 measured.
    A 256-sequence decode step at 1k context: 1.09 + 2.41 + max(5.0 + 11.45, 4.8 + 0.17) = 20.0 ms.
    A 2048-token prefill from empty: 1.09 + max(5.0, 38.4 + 1.4) = 40.9 ms, compute-bound.
    The server path (request_s, token_s) has no H100 measurement yet and is 0.
    KV per worker: what is left of 90% of the 80 GB after the weights, (72 - 16.06) GB / 131072 B =
    426,788 tokens.
    """
    bandwidth, flops, memory, weights, kv_bytes = 3.0e12, 800e12, 80e9, 16.06e9, 131072
    c2 = (8.5e-3 - 6.1e-3) / 255
    model = StepModel(c0=6.1e-3 - 5.0e-3 - c2, c1=2 * 7.5e9 / flops, c2=c2, c3=kv_bytes / bandwidth,
                      c4=4 * 4096 * 32 / flops, weights_s=15.0e9 / bandwidth, overlap=1.0)
    return model, int((memory * 0.9 - weights) / kv_bytes), 131072  # Llama 3.1's context length


def cpu_demo() -> tuple[StepModel, int, int]:
    """The built-in demo model served by `python -m server --workers 2` on a 2-core CPU machine (one
    intra-op thread per worker, the C++ paged-attention kernel, weights packed for oneDNN): the step
    model, the KV tokens per worker (8192 blocks of 16) and the demo's context length.

    Fitted on 2026-12-01 (13:51 UTC, the machine otherwise idle) by `benchmarks/replay_accuracy.py`'s
    fcfs server: `simulate fit` on the 9,696 steps of its capacity run (16 in flight) and its Poisson
    run at 60% of capacity (Azure conversation requests clamped to 256 tokens, SAL), the server path
    from the latter's 100 requests. Held-out steps: mean |error| 21% per step, total time +1.5%. The
    means only: a fit's spreads (per step, and the machine's speed per window) are not part of the
    preset, so its steps take exactly the model's time.
    """
    model = StepModel(c0=0.0, c1=1.209e-4, c2=3.036e-4, c3=0.0, c4=8.24e-9, weights_s=3.531e-3, overlap=0.75,
                      loop_s=5.30e-4, request_s=3.51e-3, first_token_s=7.24e-3, token_s=2.73e-3)
    return model, 8192 * 16, 4096


# The SLAI authors' measured Sarathi-Serve batch times: Mistral-7B-Instruct-v0.2 on one RTX 6000 Ada,
# one 2048-token prompt prefilled in chunks of `chunk` tokens at batch size 1, mean batch time in ms
# (github.com/agrimUT/SLAI, scripts/plot1_results.csv, columns chunk and batch_ms; made by
# scripts/run_plot1.sh).
SLAI_PLOT1_BATCH_MS = ((64, 22.717), (128, 24.070), (256, 28.817), (384, 37.796), (512, 46.512),
                       (768, 57.083), (1024, 74.693))


def rtx6000ada_mistral7b() -> tuple[StepModel, int, int]:
    """One RTX 6000 Ada (48 GB, 960 GB/s) serving Mistral-7B-Instruct-v0.2 in bf16, the SLAI paper's
    machine: the step model, the KV tokens and the context length.

    Fitted to SLAI_PLOT1_BATCH_MS. Each batch there is one prefill chunk of one request, so the
    batch size never varies and chunk size and context grow together: the data fix c0 and c1 but
    cannot separate c2 or c3 from them. So:
    - c3 = 131072 B of KV per token (32 layers x 8 KV heads x 128 x 2 (K and V) x 2 B) / 960 GB/s
      = 136.5 ns per KV token read, from the card's bandwidth, not fitted;
    - c2 = 0: no data varies the number of sequences;
    - c0, c1: least squares of the mean batch time, less c3 x the mean chunk end, on the mean
      chunk size (2048 split into chunks of `chunk`, the last one partial), over the 7 rows:
      c0 = 17.3 ms (the 14.5 GB of weights read once take 15.1 ms), c1 = 56.3 us per token
      (257 TFLOP/s of 2 x 7.24e9 FLOP per token); residuals within 3.1 ms, RMSE 1.5 ms.
    KV: 236k tokens, the issue's and papers.md's estimate for that card (49,140 MiB x 0.9, less
    14.5 GB of weights and about 1 GB of activations, / 131072 B). Context: Mistral v0.2's 32k.
    """
    c3 = 131072 / 960e9
    x, y = [], []
    for chunk, ms in SLAI_PLOT1_BATCH_MS:
        sizes = [chunk] * (2048 // chunk) + ([2048 % chunk] if 2048 % chunk else [])
        x.append([1.0, float(np.mean(sizes))])
        y.append(ms / 1e3 - c3 * float(np.mean(np.cumsum(sizes))))
    c0, c1 = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)[0]
    return StepModel(c0=float(c0), c1=float(c1), c2=0.0, c3=c3), 236_000, 32768


PRESETS = {"h100-llama3-8b": h100_llama3_8b(), "cpu-demo": cpu_demo(),
           "rtx6000ada-mistral7b": rtx6000ada_mistral7b()}


# ---- reading step logs ------------------------------------------------------------------------------
def read_step_logs(path: str | Path) -> list[dict]:
    """Every step of a step-log directory (its worker-*.jsonl) or of one JSONL file."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no step logs (*.jsonl) there")
    rows = []
    for f in files:
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def step_targets(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Features [T, S, K, P] and each step's duration."""
    try:
        x = np.array([[r["batched_tokens"], r["num_seqs"], r["kv_tokens_read"], r.get("attention_pairs", 0)]
                      for r in rows], dtype=np.float64)
        seconds = np.array([r["seconds"] for r in rows], dtype=np.float64)
    except (KeyError, TypeError):
        raise ValueError("every step needs batched_tokens, num_seqs, kv_tokens_read and seconds") from None
    return x, seconds


def loop_gaps(rows: list[dict]) -> np.ndarray:
    """The worker loop's time between steps: the gap before each step whose predecessor left work
    (after an idle gap the worker was waiting for requests, not looping)."""
    return np.array([r["gap_s"] for r in rows if r.get("busy_before") and r.get("gap_s") is not None],
                    dtype=np.float64)


# ---- fitting the step terms -------------------------------------------------------------------------
def _design(x: np.ndarray, overlap: float, memory_bound: np.ndarray) -> np.ndarray:
    """Columns for STEP_TERMS given which steps are memory-bound: the smaller side is scaled by
    (1 - overlap), which makes the model linear in its coefficients."""
    t, s, k, p = x.T
    keep_mem = np.where(memory_bound, 1.0, 1.0 - overlap)
    keep_comp = np.where(memory_bound, 1.0 - overlap, 1.0)
    return np.column_stack([np.ones_like(t), s, keep_mem, keep_mem * k, keep_comp * t, keep_comp * p])


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray, active: list[int]) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative column and solve again (time
    only adds up; a negative coefficient is noise or a collinear column)."""
    active = list(active)
    while True:
        coef = np.zeros(a.shape[1])
        if active:
            sub = a[:, active]
            scale = np.linalg.norm(sub, axis=0)
            scale[scale == 0] = 1.0
            coef[active] = np.linalg.lstsq(sub / scale, y, rcond=None)[0] / scale
        worst = min(active, key=lambda j: coef[j], default=None)
        if worst is None or coef[worst] >= 0:
            return coef
        active.remove(worst)


def _fit_overlap(x: np.ndarray, y: np.ndarray, overlap: float) -> np.ndarray:
    # Terms the data cannot tell apart are left out: attention pairs that were never logged, and
    # the per-step weight stream, which at overlap 0 is one more constant beside c0.
    active = [j for j in range(6) if not (j == 5 and not x[:, 3].any()) and not (j == 2 and overlap == 0)]
    summed = _nonneg_lstsq(_design(x, 0.0, np.ones(len(x), dtype=bool)), y, [j for j in active if j != 2])
    if overlap == 0:
        return summed
    best, best_sse = summed, math.inf
    # Alternate: regimes from the coefficients, coefficients from the regimes. The split is not
    # convex, so start from each plain guess and from the sum's coefficients; keep the best.
    for memory_bound in (np.ones(len(x), dtype=bool), np.zeros(len(x), dtype=bool),
                         summed[3] * x[:, 2] >= summed[4] * x[:, 0] + summed[5] * x[:, 3]):
        for _ in range(30):
            coef = _nonneg_lstsq(_design(x, overlap, memory_bound), y, active)
            now_bound = coef[2] + coef[3] * x[:, 2] >= coef[4] * x[:, 0] + coef[5] * x[:, 3]
            if (now_bound == memory_bound).all():
                break
            memory_bound = now_bound
        sse = float(np.sum((_design(x, overlap, now_bound) @ coef - y) ** 2))
        if sse < best_sse:
            best, best_sse = coef, sse
    return best


def _model(coef: np.ndarray, overlap: float, **path) -> StepModel:
    c = dict(zip(STEP_TERMS, map(float, coef)))
    return StepModel(c0=c["c0"], c1=c["c1"], c2=c["c2"], c3=c["c3"], c4=c["c4"], weights_s=c["weights_s"],
                     overlap=overlap, **path)


def predict_steps(model: StepModel, x: np.ndarray) -> np.ndarray:
    return np.array([model.step_seconds(StepFeatures(int(t), int(s), 0, 0, int(k), int(p))) for t, s, k, p in x])


def _errors(model: StepModel, x: np.ndarray, y: np.ndarray) -> dict:
    pred = predict_steps(model, x)
    return {"steps": int(len(y)), "mean_abs_rel_error": float(np.mean(np.abs(pred - y) / y)),
            "total_time_rel_error": float((pred.sum() - y.sum()) / y.sum())}


def _unit_spread(factors: np.ndarray) -> tuple[float, ...]:
    q = np.asarray(spread_of(factors))
    return tuple(map(float, q / q.mean()))


def window_speeds(rows: list[dict], seconds: np.ndarray, predicted: np.ndarray,
                  window_s: float = SPEED_WINDOW_S) -> tuple[np.ndarray, np.ndarray]:
    """The machine's speed per window of wall time: each step's window (counted from the first step's
    start), and each window's measured over predicted time of every worker's steps that started in it,
    NaN for a window of fewer than MIN_WINDOW_STEPS steps (or all of them, if the log has no start times)."""
    if any("start" not in r for r in rows):
        return np.zeros(len(rows), dtype=int), np.full(1, np.nan)
    start = np.array([r["start"] for r in rows])
    window = ((start - start.min()) // window_s).astype(int)
    speed = np.bincount(window, seconds) / np.maximum(np.bincount(window, predicted), 1e-12)
    return window, np.where(np.bincount(window) >= MIN_WINDOW_STEPS, speed, np.nan)


def lag_correlation(speed: np.ndarray) -> float:
    """The correlation of consecutive windows' speeds (NaN: no speed) as normal scores, the rank of each
    speed through the normal quantile function, so that the spread's own shape does not enter; a
    negative one (noise, with few windows) counts as none."""
    measured = ~np.isnan(speed)
    pairs = measured[:-1] & measured[1:]
    if pairs.sum() < 3:
        return 0.0
    ranks = np.argsort(np.argsort(speed[measured]))
    scores = np.full(len(speed), np.nan)
    scores[measured] = [NORMAL.inv_cdf((r + 0.5) / measured.sum()) for r in ranks]
    return max(float(np.corrcoef(scores[:-1][pairs], scores[1:][pairs])[0, 1]), 0.0)


class MachineSpeed:
    """The machine's speed through the simulator's time: one factor per speed_window_s from the model's
    speed_spread, each window's normal score correlated speed_correlation with the one before (k windows
    on, speed_correlation**k). Asked in time order; 1 throughout for a model without a speed spread."""

    def __init__(self, model: StepModel, rng: np.random.Generator):
        self.model, self.rng = model, rng
        self.window: int | None = None
        self.score, self.factor = 0.0, 1.0

    def at(self, now: float) -> float:
        window = int(now // self.model.speed_window_s)
        if self.model.speed_spread and window != self.window:
            carry = 0.0 if self.window is None else self.model.speed_correlation ** (window - self.window)
            self.score = carry * self.score + math.sqrt(1 - carry * carry) * float(self.rng.standard_normal())
            self.window, self.factor = window, self.model.quantile("speed", NORMAL.cdf(self.score))
        return self.factor


def run_window(results: dict) -> tuple[float, float] | None:
    """A loadgen run's span on the monotonic clock the step log shares (a second's margin each side),
    from its results.json; None for a run recorded without t0_monotonic."""
    t0 = results["config"].get("t0_monotonic")
    return None if t0 is None else (t0 - 1.0, t0 + results["summary"]["duration"] + 1.0)


def fit_steps(rows: list[dict], overlap: float | None = None, speed_window_s: float = SPEED_WINDOW_S,
              speed_correlation: float | None = None) -> tuple[StepModel, dict]:
    """The step terms from step-log rows; `overlap` None: the grid value with the least held-out error;
    the machine's speed per `speed_window_s`, and `speed_correlation` None: its fitted correlation."""
    x, y = step_targets(rows)
    held = np.arange(len(y)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if len(y) < 3 * HOLDOUT_EVERY or np.linalg.matrix_rank(np.column_stack([np.ones(len(x)), x[:, :3]])) < 4:
        raise ValueError(f"need steps that vary tokens, sequences and KV read independently to fit the step "
                         f"model ({len(y)} steps given)")
    grid = OVERLAP_GRID if overlap is None else (overlap,)
    trials = []
    for o in grid:
        m = _model(_fit_overlap(x[~held], y[~held], o), o)
        trials.append((float(np.sum((predict_steps(m, x[held]) - y[held]) ** 2)), o, m))
    _, best_overlap, train_model = min(trials, key=lambda t: t[0])
    coef = _fit_overlap(x, y, best_overlap)
    gaps = loop_gaps(rows)
    loop_s, loop_se = _mean_se(gaps) if gaps.size else (0.0, None)
    model = _model(coef, best_overlap, loop_s=loop_s)
    pred = np.maximum(predict_steps(model, x), 1e-9)
    window, speed = window_speeds(rows, y, pred, speed_window_s)
    measured = speed[~np.isnan(speed)]
    model = dataclasses.replace(model, step_spread=_unit_spread(y / pred / np.nan_to_num(speed[window], nan=1.0)),
                                speed_spread=_unit_spread(measured) if len(measured) > 1 else (),
                                speed_window_s=speed_window_s,
                                speed_correlation=lag_correlation(speed) if speed_correlation is None
                                else speed_correlation)
    # Standard errors at the final regimes, over the terms left free (a term held at 0 has none).
    memory = model.weights_s + model.c3 * x[:, 2]
    a = _design(x, best_overlap, memory >= model.c1 * x[:, 0] + model.c4 * x[:, 3])
    free = [j for j in range(6) if coef[j] > 0]
    dof = max(len(y) - len(free), 1)
    sigma2 = float(np.sum((pred - y) ** 2)) / dof
    errors = {name: None for name in STEP_TERMS}
    if free:
        cov = sigma2 * np.linalg.pinv(a[:, free].T @ a[:, free])
        for j, d in zip(free, np.sqrt(np.clip(np.diag(cov), 0, None))):
            errors[STEP_TERMS[j]] = float(d)
    errors["loop_s"] = loop_se
    return model, {"steps": int(len(y)), "overlap_grid_heldout_sse": {f"{o:g}": sse for sse, o, _ in trials},
                   "standard_errors": errors, "rmse_s": math.sqrt(sigma2),
                   "heldout": _errors(train_model, x[held], y[held]), "train": _errors(model, x, y)}


# ---- fitting the server path ------------------------------------------------------------------------
def _mean_se(v) -> tuple[float, float | None]:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def server_path(rows: list[dict], runs: list[dict]) -> dict:
    """request_s, first_token_s and token_s from the runs' send, first-chunk and end times
    (results.json) against the engine's arrivals and token steps (step logs), all on the monotonic
    clock. A live request and an engine request are paired by their lengths, in time order."""
    arrivals, first, last = {}, {}, {}
    busy: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        end = r["start"] + r["seconds"]
        busy.setdefault(r.get("worker"), []).append((r["start"], end))
        for rid, server_arrival, engine_add, prompt, max_tokens in r.get("arrived", ()):
            arrivals[rid] = (server_arrival, engine_add, prompt, max_tokens, r.get("worker"))
        for rid, _, _, got in r.get("chunks", ()):
            if got:
                first.setdefault(rid, end)
                last[rid] = end
    # Server to worker, for requests that found their worker idle (blocked on its queue); one that
    # came during a step waits for the step's end, which the simulator plays itself.
    steps = {w: np.array(sorted(v)) for w, v in busy.items()}
    dispatch = []
    for server_arrival, engine_add, _, _, worker in arrivals.values():
        s = steps[worker]
        i = np.searchsorted(s[:, 1], server_arrival)
        if not (i < len(s) and s[i, 0] <= server_arrival):
            dispatch.append(engine_add - server_arrival)
    http, first_token, last_token = [], [], []
    for results in runs:
        t0 = results["config"].get("t0_monotonic")  # the client's clock origin: its send times count from it
        if (span := run_window(results)) is None:
            raise ValueError("the run's results.json has no t0_monotonic: record it with this version of loadgen")
        begin, end = span
        by_shape: dict[tuple[int, int], list] = {}
        for rid, (at, _, prompt, max_tokens, _) in arrivals.items():
            if begin <= at <= end and rid in last:  # warm-up requests came before t0
                by_shape.setdefault((prompt, max_tokens), []).append((at, rid))
        live: dict[tuple[int, int], list] = {}
        for q in results["requests"]:
            if q["success"] and q.get("requested_output_tokens"):
                live.setdefault((q["input_tokens"], q["requested_output_tokens"]), []).append(q)
        for shape, engine_side in by_shape.items():
            client_side = live.get(shape, [])
            if len(client_side) != len(engine_side):
                continue  # ambiguous: pair only shapes both sides saw equally often
            for (at, rid), q in zip(sorted(engine_side), sorted(client_side, key=lambda q: q["start_s"])):
                sent = t0 + q["start_s"]
                http.append(at - sent)
                first_token.append(sent + q["ttft_ms"] / 1e3 - first[rid])
                last_token.append(sent + q["e2el_ms"] / 1e3 - last[rid])
    if not http:
        raise ValueError("no request of the run could be paired with the step logs' requests: "
                         "were they logged by the server this run measured?")
    (h, h_se), (f, f_se), (t, t_se) = _mean_se(http), _mean_se(first_token), _mean_se(last_token)
    d, d_se = _mean_se(dispatch) if dispatch else (0.0, None)
    se = None if h_se is None or d_se is None else math.hypot(h_se, d_se)
    # A request's own path: its HTTP part plus a dispatch drawn from the idle arrivals.
    request = np.asarray(http) + (np.random.default_rng(0).choice(dispatch, len(http)) if dispatch else 0.0)
    clip = lambda v: spread_of(np.maximum(v, 0.0))  # noqa: E731 - clocks of two processes: never below 0
    return {"request_s": max(h + d, 0.0), "first_token_s": max(f, 0.0), "token_s": max(t, 0.0),
            "request_spread": clip(request), "first_token_spread": clip(first_token), "token_spread": clip(last_token),
            "paired_requests": len(http),
            "standard_errors": {"request_s": se, "first_token_s": f_se, "token_s": t_se}}


def fit(step_log: str | Path, results_dirs: list[str | Path] = (), overlap: float | None = None,
        speed_window_s: float = SPEED_WINDOW_S, speed_correlation: float | None = None) -> tuple[StepModel, dict]:
    """The step model from a step log; with loadgen runs against that server, from their steps only
    (a log directory may hold several runs), and the server's path terms from their timestamps."""
    from loadgen.report import load_results
    rows = read_step_logs(step_log)
    runs = [load_results(d) for d in results_dirs]
    windows = [span for span in map(run_window, runs) if span is not None]
    if windows:
        rows = [r for r in rows if "start" not in r or any(a <= r["start"] <= b for a, b in windows)]
    model, quality = fit_steps(rows, overlap, speed_window_s, speed_correlation)
    if runs:
        # The server path from open-loop runs where there are any: a closed loop (--max-concurrency)
        # sends each request as another ends, when the server is busiest (its HTTP part took twice as
        # long as in a Poisson run of the same server, BENCHMARKS.md).
        path = server_path(rows, [r for r in runs if not r["config"].get("max_concurrency")] or runs)
        model = dataclasses.replace(model, **{k: path[k] for part in SERVER_PATH
                                              for k in (f"{part}_s", f"{part}_spread")})
        quality["standard_errors"] |= path["standard_errors"]
        quality["paired_requests"] = path["paired_requests"]
    return model, quality


def correlation(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def fit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen simulate fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step_log_path", nargs="?", metavar="STEP_LOG", help="same as --step-log")
    p.add_argument("--step-log", metavar="DIR", help="the server's --step-log directory (or one JSONL file)")
    p.add_argument("--results", metavar="RUN_DIR", action="append", default=[],
                   help="a loadgen --output of a run against that server (repeatable): fits on those runs' "
                        "steps only, and the server path's request_s, first_token_s and token_s")
    p.add_argument("--overlap", type=float, help="fix the memory/compute overlap (0: sum, 1: max) "
                                                 "instead of choosing it on held-out steps")
    p.add_argument("--speed-window-s", type=positive_float, default=SPEED_WINDOW_S,
                   help="the window of wall time the machine's speed is fitted over and drawn per")
    p.add_argument("--speed-correlation", type=correlation, help="fix the correlation of one window's speed with "
                                                           "the next's (0: independent) instead of fitting it")
    p.add_argument("--output", metavar="FILE", help="write the model here, for --step-model")
    args = p.parse_args(argv)
    step_log = args.step_log or args.step_log_path
    if not step_log:
        p.error("give --step-log DIR")
    model, quality = fit(step_log, args.results, args.overlap, args.speed_window_s, args.speed_correlation)
    print_fit(model, quality)
    if args.output:
        Path(args.output).write_text(json.dumps(model.as_dict() | {"fit": quality}, indent=2) + "\n")
    return 0


def print_fit(model: StepModel, quality: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Step model: {quality['steps']} steps, overlap {model.overlap:g}")
    table.add_column("Term")
    table.add_column("Value", justify="right")
    table.add_column("Std. error", justify="right")
    for name, value in model.as_dict().items():
        if name in SPREADS:
            continue
        se = quality["standard_errors"].get(name)
        if name in ("overlap", "speed_window_s", "speed_correlation"):
            note = ""
        elif name in [f"{part}_s" for part in SERVER_PATH] and "paired_requests" not in quality:
            note = "needs --results"
        else:
            note = "held at 0" if se is None and value == 0 else "n/a" if se is None else f"{se:.2g}"
        table.add_row(name, f"{value:.4g}", note)
    console = Console()
    console.print(table)
    h, t = quality["heldout"], quality["train"]
    console.print(f"held-out steps ({h['steps']}): mean |error| {h['mean_abs_rel_error']:.1%} per step, "
                  f"total time {h['total_time_rel_error']:+.1%}; all steps: {t['mean_abs_rel_error']:.1%}, "
                  f"{t['total_time_rel_error']:+.1%}")
    for name in SPREADS:
        if spread := getattr(model, name):
            unit, scale = ("x mean", 1) if name in ("step_spread", "speed_spread") else ("ms", 1e3)
            console.print(f"{name}: p10 {spread[10] * scale:.3g}, p50 {spread[50] * scale:.3g}, "
                          f"p90 {spread[90] * scale:.3g}, p99.5 {spread[99] * scale:.3g} {unit}")
    if "paired_requests" in quality:
        console.print(f"server path from {quality['paired_requests']} paired requests")
