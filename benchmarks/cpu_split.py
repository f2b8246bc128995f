"""Where the CPU goes while a server streams: CPU seconds of the HTTP process, the balancer, the worker
and the client (loadgen) over one run, per engine step. CPU time, unlike wall time, barely depends on
what else runs on the machine, so this says how much of a core the HTTP side needs per step even on a
busy machine: the share of the last core the worker can take for its own threads.

    python benchmarks/cpu_split.py [--random-llama-100m] [--num-requests 128] [--max-concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def children(pid: int) -> dict[str, int]:
    """The server's child processes by name (halffull-balancer, halffull-w0, ...)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(rest.split()[1]) == pid:
            found[name.split("(", 1)[1]] = int(stat.parent.name)
    return found


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--random-llama-100m", action="store_true")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=8631)
    p.add_argument("server_args", nargs="*", help="more flags for python -m server (after --)")
    args = p.parse_args()
    from engine.demo import ensure_demo_model
    model, extra = str(ensure_demo_model()), []
    if args.random_llama_100m:
        from benchmarks.random_model import ensure_random_model
        model, extra = str(ensure_random_model()), ["--load-format", "dummy"]
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--port", str(args.port),
                               "--max-model-len", "2048", *extra, *args.server_args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health")
                break
            except OSError:
                time.sleep(1)
        procs = {"HTTP server": server.pid} | children(server.pid)
        before = {n: cpu_seconds(pid) for n, pid in procs.items()}
        steps0, busy0 = metric(url, "halffull:engine_steps_total"), metric(url, "halffull:worker_busy_seconds_total")
        start = time.perf_counter()
        client = subprocess.Popen([sys.executable, "-m", "loadgen", "--base-url", url + "/v1", "--model", model,
                                   "--workload", "synthetic", "--input-len", "100", "--output-len", "64",
                                   "--num-requests", str(args.num_requests), "--max-concurrency",
                                   str(args.max_concurrency), "--rate", "inf", "--output", "/tmp/cpu-split-loadgen"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(client.pid, 0)
        wall = time.perf_counter() - start
        cpu = {n: cpu_seconds(pid) - before[n] for n, pid in procs.items()}
        cpu["client (loadgen)"] = usage.ru_utime + usage.ru_stime
        steps = metric(url, "halffull:engine_steps_total") - steps0
        busy = metric(url, "halffull:worker_busy_seconds_total") - busy0
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    print(f"{args.num_requests} requests, {args.max_concurrency} in flight, {wall:.1f} s wall, {steps:.0f} steps, "
          f"worker in steps {busy:.1f} s ({1000 * busy / max(steps, 1):.1f} ms per step), {os.cpu_count()} cores")
    print("| process | CPU s | CPU ms per step | share of the run's wall time |")
    print("|---|---|---|---|")
    for name, seconds in cpu.items():
        print(f"| {name} | {seconds:.1f} | {1000 * seconds / max(steps, 1):.1f} | {seconds / wall:.0%} |")


if __name__ == "__main__":
    main()
