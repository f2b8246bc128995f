"""The step log: one JSON line per engine step, what `loadgen simulate fit` fits the step model to.

`python -m server --step-log DIR` (and `LLM(..., step_log=DIR)`) makes each worker append to
DIR/worker-<id>.jsonl. A line holds the step's counted work (scheduling/step_cost.py: prefill
tokens, decode sequences, context tokens read, attention pairs), each chunk as [request id, start,
tokens, got a token], its duration and the worker's gap before it, and the requests that arrived
since the previous step with the server's arrival time, so the fit can also measure the server's
own path (send to arrival, step end to the client's chunk).

Times are time.monotonic() (one clock for every process of the machine, the load generator's
included) plus one time.time() per step for humans. `seconds` runs from the scheduler's plan to the
outputs built: the model runner returns host-side tokens, so on a GPU the step has synchronized and
the same span is measured on CPU and GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from scheduling.step_cost import StepFeatures


class StepRecord(msgspec.Struct):
    worker: int
    wall: float  # time.time() at the step's start
    start: float  # time.monotonic() at the step's start
    seconds: float  # plan to outputs
    execute_s: float  # of which the model runner (forward and sampling)
    gap_s: float | None  # since the previous step ended; None for the first
    busy_before: bool  # whether work was left when the previous step ended: then the gap is loop overhead
    batched_tokens: int
    num_seqs: int
    prefill_tokens: int
    decode_seqs: int
    kv_tokens_read: int
    attention_pairs: int
    chunks: list[tuple[str, int, int, bool]]  # request id, start, tokens, got a token
    arrived: list[tuple[str, float, float, int, int]]  # request id, server arrival, engine add, prompt, max_tokens


class StepLog:
    def __init__(self, directory: str | Path, worker_id: int):
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        # Line-buffered: one write per step, nothing lost when the worker is killed.
        self.file = open(path / f"worker-{worker_id}.jsonl", "a", buffering=1)
        self.worker_id = worker_id
        self.encoder = msgspec.json.Encoder()
        self.arrived: list[tuple[str, float, float, int, int]] = []
        self.last_end: float | None = None
        self.busy_after_last = False

    def arrival(self, request_id: str, server_arrival: float, prompt_tokens: int, max_tokens: int) -> None:
        self.arrived.append((request_id, server_arrival, time.monotonic(), prompt_tokens, max_tokens))

    def record(self, start: float, wall: float, execute_s: float, shapes: list[tuple[int, int, bool]],
               request_ids: list[str], got_token: list[bool], busy_after: bool) -> None:
        end = time.monotonic()
        f = StepFeatures.of_chunks(shapes)
        line = StepRecord(
            self.worker_id, wall, start, end - start, execute_s,
            None if self.last_end is None else start - self.last_end, self.busy_after_last,
            f.batched_tokens, f.num_seqs, f.prefill_tokens, f.decode_seqs, f.kv_tokens_read, f.attention_pairs,
            [(rid, s, n, g) for rid, (s, n, _), g in zip(request_ids, shapes, got_token)], self.arrived)
        self.arrived = []
        self.last_end, self.busy_after_last = end, busy_after
        self.file.write(self.encoder.encode(line).decode() + "\n")

    def close(self) -> None:
        self.file.close()
