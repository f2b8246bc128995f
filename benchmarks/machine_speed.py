"""Does this machine run the same work at the same speed? Two fixed workloads, one after the other, each
alone in one process pinned to one core, nothing else running:

- `matmul`: one (4 x 256) @ (256 x 768) float32 product, 50 times per unit (a tight compute loop);
- `engine`: the offline engine on the demo model decoding the same two 40-token prompts for 150 tokens
  each (ignore_eos), one `generate` call per unit: the worker's own step, same shapes every time.

Per workload: the unit's median time; its speed (mean unit time over the window's) per window of wall
time, as a standard deviation and the correlation of one window with the next; the spread of the
30 s windows; and what would explain a slowdown inside the process: thread CPU time against wall time,
page faults, involuntary context switches and the kernel's steal time over the whole phase.

    python benchmarks/machine_speed.py [--seconds 120] [--core 0]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOWS_S = (0.5, 2.0, 10.0, 30.0)


def steal_ticks() -> int:
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def matmul_unit():
    import torch
    torch.set_num_threads(1)
    w, x = torch.randn(256, 768), torch.randn(4, 256)

    def unit():
        for _ in range(50):
            x @ w
    return unit


def engine_unit():
    import torch
    from engine.llm import LLM
    from engine.messages import SamplingParams
    torch.set_num_threads(1)
    llm = LLM()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 250) for _ in range(40)] for _ in range(2)]
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    return lambda: llm.generate(prompts, params)


def measure(unit, seconds: float) -> dict:
    unit()  # warm-up
    starts, walls, cpus = [], [], []
    r0, s0 = resource.getrusage(resource.RUSAGE_SELF), steal_ticks()
    end = time.perf_counter() + seconds
    while (t := time.perf_counter()) < end:
        c = time.thread_time()
        unit()
        starts.append(t), walls.append(time.perf_counter() - t), cpus.append(time.thread_time() - c)
    r1, s1 = resource.getrusage(resource.RUSAGE_SELF), steal_ticks()
    starts, walls = np.array(starts) - starts[0], np.array(walls)
    out = {"units": len(walls), "median_ms": float(np.median(walls) * 1e3),
           "cpu_over_wall": float(np.sum(cpus) / np.sum(walls)),
           "minor_faults": r1.ru_minflt - r0.ru_minflt, "major_faults": r1.ru_majflt - r0.ru_majflt,
           "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw, "steal_ticks": s1 - s0, "windows": {}}
    for w in WINDOWS_S:
        index = (starts // w).astype(int)
        per = np.array([walls[index == i].mean() for i in range(index.max()) if (index == i).sum() >= 3])
        if len(per) < 3:
            continue
        speed = per.mean() / per
        out["windows"][w] = {"n": len(per), "sd": float(speed.std()), "min": float(speed.min()),
                             "max": float(speed.max()), "lag1": float(np.corrcoef(speed[:-1], speed[1:])[0, 1])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="per workload")
    p.add_argument("--core", type=int, default=0)
    args = p.parse_args()
    os.sched_setaffinity(0, {args.core})
    for name, make in (("matmul", matmul_unit), ("engine", engine_unit)):
        r = measure(make(), args.seconds)
        print(f"{name}: {r['units']} units, median {r['median_ms']:.2f} ms; thread CPU / wall "
              f"{r['cpu_over_wall']:.3f}; faults {r['minor_faults']} minor, {r['major_faults']} major; "
              f"{r['involuntary_switches']} involuntary switches; {r['steal_ticks']} steal ticks")
        for w, s in r["windows"].items():
            print(f"  speed per {w:g} s window ({s['n']}): sd {s['sd']:.1%}, {s['min']:.2f}-{s['max']:.2f}, "
                  f"next-window correlation {s['lag1']:.2f}")


if __name__ == "__main__":
    main()
