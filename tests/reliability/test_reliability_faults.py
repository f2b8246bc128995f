"""Process faults under load, on one server in turn: SIGKILL of a worker (its requests end at once with a
clear 5xx, the other worker never stalls, the dead one comes back), SIGKILL of the balancer (routed requests
finish, the rest end cleanly, a new balancer takes over, nothing hangs), and last SIGTERM of the server (in
flight requests finish or get a clean error within the grace period; no orphan, no segment left)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from harness import Footprint, child_named, completion, process_tree, running, send, wait_idle
from server_utils import ServerProcess

WORKERS, GRACE = 2, 3.0


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--workers", str(WORKERS), "--balancer", "round-robin", "--num-kv-blocks", "512",
                      "--max-model-len", "4096", "--shutdown-grace-s", str(GRACE))
    yield s
    s.stop()  # the SIGTERM test has normally stopped it already
    assert "Traceback" not in s.output(), s.output()  # no exception escaped anywhere


def wait_healthy(server, timeout: float) -> float:
    start = time.monotonic()
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() - start < timeout, server.output()[-3000:]
        time.sleep(0.2)
    return time.monotonic() - start


async def under_load(server, bodies: list[bytes], fault, at: float, later: list[bytes] = ()):
    """Send `bodies` at once, run `fault` `at` seconds later, then send `later`: the outcomes of both, and when
    the fault hit."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        first = [asyncio.ensure_future(send(client, b)) for b in bodies]
        await asyncio.sleep(at)
        hit = time.monotonic()
        fault()
        rest = [asyncio.ensure_future(send(client, b)) for b in later]
        return await asyncio.gather(*first), await asyncio.gather(*rest), hit


def test_worker_sigkill(server):
    victim = child_named(server.proc.pid, "halffull-w1")
    # Long enough that no request can finish within the second before the kill, however fast the machine.
    bodies = [completion(f"load {i}", 1000, stream=i % 3 != 2) for i in range(12)]
    done, _, hit = asyncio.run(under_load(server, bodies, lambda: os.kill(victim, signal.SIGKILL), at=1.0))
    failed = [o for o in done if o.kind != "ok"]
    survived = [o for o in done if o.kind == "ok"]
    assert failed and survived, done  # round-robin put requests on both workers
    for o in failed:
        assert o.kind == "error" and "died" in o.message and o.end - hit < 1.5, o
        assert o.status == 503 or o.event_times, o  # non-streaming: a 503; streaming: an error event
    for o in survived:
        if o.event_times:  # the other worker kept going while the dead one restarted beside it
            gaps = [b - a for a, b in zip(o.event_times, o.event_times[1:]) if b > hit]
            assert max(gaps) < 2.0, max(gaps)
        else:
            assert o.tokens == 1000
    wait_healthy(server, 90)
    assert child_named(server.proc.pid, "halffull-w1") not in (None, victim)
    m = wait_idle(server.url, WORKERS)
    assert m["halffull:worker_restarts_total"] == {"0": 0.0, "1": 1.0}
    results = asyncio.run(under_load(server, [completion("again", 5)] * 4, lambda: None, 0))[0]
    assert all(o.kind == "ok" and o.tokens == 5 for o in results), results


def test_balancer_sigkill(server):
    victim = child_named(server.proc.pid, "halffull-bal")
    bodies = [completion(f"routed {i}", 200, stream=i % 2 == 0) for i in range(8)]
    later = [completion(f"during {i}", 20, stream=i % 2 == 0) for i in range(8)]
    start = time.monotonic()
    routed, during, hit = asyncio.run(under_load(server, bodies, lambda: os.kill(victim, signal.SIGKILL), 1.0, later))
    # Routed requests stream straight from the workers: they finish. Those sent meanwhile wait for the new
    # balancer or end with a clean error; none hangs, none is dropped.
    assert all(o.kind == "ok" for o in routed), routed
    assert all(o.kind in ("ok", "error") for o in during), during
    assert all(o.end - start < 30 for o in routed + during)
    wait_healthy(server, 20)
    assert child_named(server.proc.pid, "halffull-bal") not in (None, victim)
    m = wait_idle(server.url, WORKERS)
    assert m["halffull:balancer_restarts_total"] == {"": 1.0}
    results = asyncio.run(under_load(server, [completion("after", 5)] * 4, lambda: None, 0))[0]
    assert all(o.kind == "ok" and o.tokens == 5 for o in results), results


def test_sigterm_under_load(server):
    tree, segments = process_tree(server.proc.pid), Footprint.of(server.proc.pid).segments
    assert len(tree) >= WORKERS + 2 and segments
    short = [completion(f"short {i}", 10, stream=i % 2 == 0) for i in range(4)]
    long = [completion(f"long {i}", 2000, stream=i % 2 == 0) for i in range(6)]
    done, _, hit = asyncio.run(under_load(server, short + long, lambda: server.proc.send_signal(signal.SIGTERM), 1.0))
    assert all(o.kind == "ok" for o in done[:len(short)]), done
    for o in done[len(short):]:  # cut at the end of the grace period, with a clean error
        assert o.kind == "error" and "shutting down" in o.message, o
        assert GRACE - 0.5 < o.end - hit < GRACE + 2.0, o.end - hit
    assert server.proc.wait(GRACE + 15) == 0, server.output()[-3000:]
    deadline = time.monotonic() + 5  # multiprocessing's resource tracker exits once its last user has
    while [p for p in tree if running(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in tree if running(p)] == []
    assert [s for s in segments if Path(f"/dev/shm/{s}").exists()] == []
