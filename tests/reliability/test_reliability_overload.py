"""Overload with a queue limit: a burst of ten times what the server can hold gets fast 429s with Retry-After
for what does not fit, everything admitted finishes, and memory and fds stay flat over repeated bursts."""

from __future__ import annotations

import asyncio

import pytest

from harness import Footprint, burst, check_error_shape, completion, settled_footprint, wait_idle
from server_utils import ServerProcess

# A request counts against --max-queued-requests until its first token, so a burst finds room for exactly
# that many: the server's capacity. The batch slots (--max-num-seqs per worker) hold them all.
SEQS, CAPACITY, WORKERS = 8, 16, 2
MAX_TOKENS = 200  # an admitted request takes seconds, even on a fast machine


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--workers", str(WORKERS), "--num-kv-blocks", "256", "--max-model-len", "256",
                      "--max-num-seqs", str(SEQS), "--max-queued-requests", str(CAPACITY))
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output(), s.output()  # no exception escaped anywhere


def test_burst_of_ten_times_capacity(server):
    bodies = [completion(f"burst {i}", MAX_TOKENS) for i in range(10 * CAPACITY)]
    footprints = []
    for _ in range(3):
        results = asyncio.run(burst(server.url, bodies))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        ok = [r for s, _, r in results if s == 200]
        rejected = [(t, r) for s, t, r in results if s == 429]
        assert len(ok) >= CAPACITY and len(rejected) >= 5 * CAPACITY, (len(ok), len(rejected))
        assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in ok)
        for _, r in rejected:
            check_error_shape(r.json())
            assert int(r.headers["retry-after"]) >= 1
        # Refusals come at once, not after a wait in some queue: all of them before any admitted request is done.
        refused = max(t for t, _ in rejected)
        admitted = min(t for s, t, _ in results if s == 200)
        assert refused < min(admitted, 3.0), (refused, admitted)
        wait_idle(server.url, WORKERS)
        baseline = footprints[0] if footprints else Footprint.of(server.proc.pid)
        footprints.append(settled_footprint(server.proc.pid, baseline))
    first, last = footprints[0], footprints[-1]
    assert last.fds <= first.fds, footprints
    assert last.segments == first.segments
    assert last.rss_mb - first.rss_mb < 16, footprints  # flat after the first burst warmed everything up
    m = server.metrics()
    assert m["halffull:request_rejected_total"] >= 15 * CAPACITY
