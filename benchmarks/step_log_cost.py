"""What the step log (engine/step_log.py) costs per step: one JSON line with the step's features and
every chunk, written through a line-buffered file, for batches of 1, 32 and 256 decode sequences.

    python benchmarks/step_log_cost.py
"""

import tempfile
import time

from engine.step_log import StepLog


def main(steps: int = 2000) -> None:
    log = StepLog(tempfile.mkdtemp(), 0)
    for batch in (1, 32, 256):
        shapes = [(1000 + i, 1, True) for i in range(batch)]
        ids = [f"cmpl-{i:08x}-0" for i in range(batch)]
        got = [True] * batch
        t = time.perf_counter()
        for _ in range(steps):
            log.record(time.monotonic(), time.time(), 1e-3, shapes, ids, got, True)
        print(f"{batch:4d} sequences: {(time.perf_counter() - t) / steps * 1e6:6.1f} µs per step")
    log.close()


if __name__ == "__main__":
    main()
