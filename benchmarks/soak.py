"""Reliability soak: the full-size versions of tests/reliability, in cycles, for --duration seconds, against a
server it starts (or --url, with --pid for the process-level checks). Each cycle: schema-driven fuzz of both
generation endpoints, a burst of ten times the queue limit, 1,000 requests cut by the client at random points,
SIGKILL of a worker and of the balancer under load; after each phase the server must come back to idle with
every KV block free. At the end, SIGTERM under load. Prints a Markdown table.

    python benchmarks/soak.py --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from harness import (VALID, Footprint, body_with, burst, check_answer, child_named, completion, cut_many,  # noqa: E402
                     field_values, hostile_body, leaked_blocks, memory_mb, process_tree, running, send,
                     settled_footprint, wait_idle, worker_metrics)

QUEUE_LIMIT, GRACE = 16, 5.0


class Tally(Counter):
    """Outcomes by kind; `lost` is anything that is neither an answer nor a clean error."""

    def note(self, kind: str, detail: str = "") -> None:
        self["sent"] += 1
        self[kind] += 1
        if kind == "lost":
            print(f"  LOST: {detail[:300]}", file=sys.stderr)


def fuzz(url: str, tally: Tally, per_field: int, mixed: int, seed: int) -> None:
    spec = httpx.get(url + "/openapi.json").json()
    with httpx.Client(base_url=url, timeout=120) as http:
        def run(strategy, n):
            @hypothesis_seed(seed)
            @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def case(args):
                path, body = args
                try:
                    r = http.post(path, content=body, headers={"content-type": "application/json"})
                    tally.note({"ok": "completed", "4xx": "rejected_4xx"}[check_answer(r)])
                except (AssertionError, httpx.HTTPError) as e:
                    tally.note("lost", f"{body[:200]!r}: {e!r}")
            case()
        for path in VALID:
            fields = field_values(spec, path)
            for name, values in fields.items():
                run(values.map(lambda v, p=path, n=name: (p, body_with(p, {n: v}))), per_field)
            run(hostile_body(path, fields).map(lambda b, p=path: (p, b)), mixed)


def overload(url: str, tally: Tally, n: int) -> None:
    for status, _, r in asyncio.run(burst(url, [completion(f"burst {i}", 32) for i in range(n)])):
        tally.note({200: "completed", 429: "rejected_429"}.get(status, "lost"), f"burst: {status}")


def aborts(url: str, tally: Tally, n: int, rng: random.Random) -> None:
    port = int(url.rsplit(":", 1)[1])
    for _ in range(sum(asyncio.run(cut_many(port, n, rng, concurrency=32)).values())):
        tally.note("cut")


async def load_and(url: str, tally: Tally, bodies: list[bytes], fault, at: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        tasks = [asyncio.ensure_future(send(client, b)) for b in bodies]
        await asyncio.sleep(at)
        fault()
        for o in await asyncio.gather(*tasks):
            tally.note({"ok": "completed", "error": "failed"}.get(o.kind, "lost"), f"{o}")


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy again")


def faults(url: str, pid: int, tally: Tally, rng: random.Random, workers: int) -> None:
    for name in (f"halffull-w{rng.randrange(workers)}", "halffull-bal"):
        victim = child_named(pid, name)
        bodies = [completion(f"{name} {i}", 1000, stream=i % 2 == 0) for i in range(12)]
        asyncio.run(load_and(url, tally, bodies, lambda: os.kill(victim, signal.SIGKILL), rng.uniform(0.5, 2.0)))
        wait_healthy(url)
        tally["killed worker" if name.startswith("halffull-w") else "killed balancer"] += 1


def sigterm(url: str, server, tally: Tally) -> tuple[int, int, int]:
    """SIGTERM under load: exit code, processes left running, segments left in /dev/shm."""
    tree, segments = process_tree(server.proc.pid), Footprint.of(server.proc.pid).segments
    bodies = [completion(f"last {i}", 10 if i < 4 else 5000, stream=i % 2 == 0) for i in range(10)]
    asyncio.run(load_and(url, tally, bodies, lambda: server.proc.send_signal(signal.SIGTERM), 1.0))
    code = server.proc.wait(GRACE + 30)
    deadline = time.monotonic() + 5
    while [p for p in tree if running(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return code, len([p for p in tree if running(p)]), len([s for s in segments if Path(f"/dev/shm/{s}").exists()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds; the cycle under way is finished")
    p.add_argument("--url", default=None, help="an already running server (started with --max-queued-requests)")
    p.add_argument("--pid", type=int, default=None, help="with --url: its pid, for the fault and footprint checks")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fuzz-per-field", type=int, default=10)
    p.add_argument("--fuzz-mixed", type=int, default=200)
    p.add_argument("--aborts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    server = None
    if args.url is None:
        from server_utils import ServerProcess
        server = ServerProcess("--workers", str(args.workers), "--num-kv-blocks", "512", "--max-model-len", "2048",
                               "--max-num-seqs", "16", "--max-queued-requests", str(QUEUE_LIMIT),
                               "--max-request-body-bytes", str(256 << 10), "--shutdown-grace-s", str(GRACE))
    url, pid = (server.url, server.proc.pid) if server else (args.url.rstrip("/"), args.pid)
    tally, leaks = Tally(), []

    def idle(phase: str) -> None:
        try:
            leaks.append(leaked_blocks(wait_idle(url, args.workers, timeout=30)))
        except AssertionError as e:
            print(f"  NOT IDLE after {phase}: {e}", file=sys.stderr)
            leaks.append(leaked_blocks(worker_metrics(url)))

    try:
        overload(url, tally, 10 * QUEUE_LIMIT)  # warm-up, so that "start" is after first-use allocations
        aborts(url, tally, 50, rng)
        idle("warm-up")
        start = Footprint.of(pid) if pid else None
        began, cycle = time.monotonic(), 0
        phases = [("fuzz", lambda: fuzz(url, tally, args.fuzz_per_field, args.fuzz_mixed, args.seed + cycle)),
                  ("overload", lambda: overload(url, tally, 10 * QUEUE_LIMIT)),
                  ("aborts", lambda: aborts(url, tally, args.aborts, rng))]
        if pid:
            phases.append(("faults", lambda: faults(url, pid, tally, rng, args.workers)))
        while time.monotonic() - began < args.duration:
            cycle += 1
            for name, run in phases:
                t0 = time.monotonic()
                run()
                idle(name)
                heap = f", server heap {memory_mb(pid)['RssAnon']:.1f} MB" if pid else ""
                print(f"cycle {cycle} {name}: {time.monotonic() - t0:.0f}s, leaked blocks {leaks[-1]}{heap}, "
                      f"{dict(tally)}", file=sys.stderr, flush=True)
        end = settled_footprint(pid, start) if pid else None
        elapsed = time.monotonic() - began
        m = worker_metrics(url)
        restarts = (int(sum(m.get("halffull:worker_restarts_total", {}).values())),
                    int(sum(m.get("halffull:balancer_restarts_total", {}).values())))
        shutdown = sigterm(url, server, tally) if server else None
    finally:
        if server is not None:
            server.stop()

    lost = tally["lost"]
    rows = [("requests sent", tally["sent"]), ("completed (200)", tally["completed"]),
            ("rejected 429 (queue limit)", tally["rejected_429"]),
            ("rejected 4xx (hostile input)", tally["rejected_4xx"]),
            ("cut by the client", tally["cut"]),
            ("failed with a clean 5xx / error event (injected SIGKILLs, SIGTERM grace)", tally["failed"]),
            ("lost (no answer, dropped connection, 5xx on input, wrong error shape)", lost),
            ("SIGKILLs: workers / balancer", f"{tally['killed worker']} / {tally['killed balancer']}"),
            ("restarts seen: workers / balancer", f"{restarts[0]} / {restarts[1]}"),
            ("leaked KV blocks (worst after any phase)", max(leaks))]
    print(f"\n{cycle} cycles in {elapsed:.0f} s\n")
    print("| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if start is not None:
        print("\n| | start | end |\n|---|---|---|")
        print(f"| open fds (server + children) | {start.fds} | {end.fds} |")
        print(f"| shared-memory segments | {len(start.segments)} | {len(end.segments)} |")
        for part, what in (("VmRSS", "all"), ("RssAnon", "heap"), ("RssShmem", "queue-ring pages touched so far")):
            print(f"| RSS MB, server process: {what} | {start.server[part]:.1f} | {end.server[part]:.1f} |")
        print(f"| RSS MB, server + children (workers and balancer restarted since) | {start.rss_mb:.0f} | "
              f"{end.rss_mb:.0f} |")
    if shutdown is not None:
        print(f"\nSIGTERM under load: exit code {shutdown[0]}, processes left {shutdown[1]}, "
              f"segments left {shutdown[2]}")
    sys.exit(1 if lost or max(leaks) or (shutdown and any(shutdown)) else 0)


if __name__ == "__main__":
    main()
