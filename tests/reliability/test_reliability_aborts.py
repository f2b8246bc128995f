"""Requests cut by the client at random points, and a burst with no queue limit: afterwards nothing runs,
every worker has all its KV free, and the server holds no more fds or segments than before."""

from __future__ import annotations

import asyncio
import random

import pytest

from harness import Footprint, burst, completion, cut_many, settled_footprint, wait_idle
from server_utils import ServerProcess

WORKERS = 2


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--workers", str(WORKERS), "--num-kv-blocks", "512", "--max-model-len", "2048")
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output(), s.output()  # no exception escaped anywhere


def test_cut_streams_leave_nothing_behind(server):
    rng = random.Random(8)
    asyncio.run(cut_many(server.port, 20, rng))  # warm-up: the first connections allocate for good
    wait_idle(server.url, WORKERS)
    before = settled_footprint(server.proc.pid, Footprint.of(server.proc.pid))
    counts = asyncio.run(cut_many(server.port, 200, rng))
    assert min(counts.values()) >= 20, counts  # every kind of cut happened
    # Each request asked for 1000 tokens: only aborts can empty the engine this soon.
    m = wait_idle(server.url, WORKERS, timeout=10)
    assert sum(m["halffull:worker_up"].values()) == WORKERS and sum(m["halffull:worker_restarts_total"].values()) == 0
    after = settled_footprint(server.proc.pid, before)
    assert after.fds <= before.fds, (before, after)
    assert after.segments == before.segments


def test_burst_without_queue_limit_all_finish(server):
    bodies = [completion(f"unlimited {i}", 8) for i in range(200)]
    rss = []
    for _ in range(2):
        results = asyncio.run(burst(server.url, bodies))
        assert [s for s, _, _ in results] == [200] * len(bodies)
        assert all(r.json()["usage"]["completion_tokens"] == 8 for _, _, r in results)
        wait_idle(server.url, WORKERS)
        rss.append(Footprint.of(server.proc.pid).rss_mb)
    assert rss[1] - rss[0] < 16, rss


def test_stream_cut_before_its_body_starts_still_aborts():
    """A client that leaves while the response headers are being sent cancels the response before its body
    generator ever runs, so the generator cannot abort the request itself: the response must."""
    from server.serving import ChoicesStream

    class Choice:
        aborted = False

        async def abort(self):
            self.aborted = True

    async def body():
        yield b"never sent"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0.01)  # headers still in flight when the disconnect is seen

    choice = Choice()
    asyncio.run(ChoicesStream(body(), [choice])({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send))
    assert choice.aborted
