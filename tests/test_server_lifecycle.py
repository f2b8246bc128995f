"""Process lifecycle: a worker killed under load fails only its own requests, promptly, and comes
back; SIGTERM shuts everything down with exit 0, no orphans and no shared-memory segments left."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine.ipc import SEGMENT_PREFIX
from server_utils import ServerProcess

GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(SEGMENT_PREFIX)}


def mapped_segments(pid: int) -> set[str]:
    """Shared-memory segments a process has mapped (other servers may run beside this test)."""
    return {line.rsplit("/", 1)[1].split()[0] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if f"/dev/shm/{SEGMENT_PREFIX}" in line}


def child_named(server: ServerProcess, name: str) -> int:
    for pid in server.child_pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
        except FileNotFoundError:
            continue
    raise AssertionError(f"no child process named {name}")


def test_worker_killed_under_load_fails_its_requests_and_restarts():
    server = ServerProcess("--workers", "2", "--balancer", "round-robin", "--num-kv-blocks", "1024")
    try:
        victim = child_named(server, "halffull-w1")

        async def load():
            client = server.async_client(timeout=60)

            async def one(i):
                start = time.monotonic()
                try:
                    stream = await client.completions.create(model="halffull-demo", prompt=f"load {i}",
                                                             max_tokens=1200, stream=True, **GREEDY)
                    n = 0
                    async for chunk in stream:
                        n += len(chunk.choices[0].text) > 0 if chunk.choices else 0
                    return "ok", time.monotonic() - start
                except openai.APIError as e:
                    return f"error: {e}", time.monotonic()

            tasks = [asyncio.ensure_future(one(i)) for i in range(8)]
            await asyncio.sleep(1.0)  # well before any request could finish, however fast the machine
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            return results, killed_at

        results, killed_at = asyncio.run(load())
        failed = [r for r in results if r[0] != "ok"]
        ok = [r for r in results if r[0] == "ok"]
        assert ok and failed, results  # round-robin put requests on both workers
        assert all(end - killed_at < 1.5 for _, end in failed), results  # failed fast, not at the end
        assert all("died" in msg for msg, _ in failed)
        # The worker comes back and both serve again.
        deadline = time.monotonic() + 90
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.3)
        client = server.client()
        outs = [client.completions.create(model="halffull-demo", prompt="again", max_tokens=5, **GREEDY)
                for _ in range(4)]
        assert all(o.usage.completion_tokens == 5 for o in outs)
        text = httpx.get(server.url + "/metrics").text
        received = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("halffull:worker_requests_total{")]
        assert len(received) == 2 and all(r >= 2 for r in received)
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_exits_cleanly_without_orphans_or_segments():
    server = ServerProcess("--workers", "2", "--num-kv-blocks", "256")
    children = server.child_pids()
    ours = mapped_segments(server.proc.pid)
    assert len(ours) == 2 + 3 * 2  # server<->balancer, and three queues per worker
    out = server.client().completions.create(model="halffull-demo", prompt="hi", max_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3
    assert server.stop(signal.SIGTERM) == 0, server.output()
    time.sleep(0.5)
    alive = [p for p in children if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert alive == []
    assert ours & shm_segments() == set()


def test_segments_of_a_killed_process_group_are_removed_by_the_next_server():
    server = ServerProcess("--workers", "1", "--num-kv-blocks", "64")
    ours = mapped_segments(server.proc.pid)
    assert len(ours) == 2 + 3
    # Everything at once, resource tracker included: nothing is left to unlink the segments.
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert ours <= shm_segments()
    # A segment of a process that is still alive (this one) is not touched.
    alive = Path(f"/dev/shm/{SEGMENT_PREFIX}{os.getpid()}_test")
    alive.write_bytes(b"")
    try:
        second = ServerProcess("--workers", "1", "--num-kv-blocks", "64")
        try:
            assert ours & shm_segments() == set()
            assert alive.exists()
            removed = re.search(r"removed (\d+) shared-memory segments", second.output())
            assert removed and int(removed.group(1)) >= len(ours), second.output()
        finally:
            assert second.stop() == 0, second.output()
    finally:
        alive.unlink()


def test_startup_failure_exits_nonzero(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}')
    with pytest.raises(RuntimeError, match="unsupported architecture"):
        ServerProcess("--model", str(tmp_path), timeout=60)
