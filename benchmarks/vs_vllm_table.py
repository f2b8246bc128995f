"""The table of a benchmarks/vs_vllm.sh run: per repetition, model and client, both servers' figures and
halffull's ratio to vLLM; then whether the acceptance ratios held in every repetition.

    python benchmarks/vs_vllm_table.py OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CLIENTS = {"loadgen": lambda run: json.loads((run / "loadgen" / "results.json").read_text())["summary"],
           "vllm bench serve": lambda run: json.loads((run / "vllm-bench.json").read_text())}
# halffull's output tok/s must reach this multiple of vLLM's, with mean TTFT no higher.
TARGET = {"demo": 1.1, "llama100m": 1.0}
MODEL_NAMES = {"demo": "demo (3.0M)", "llama100m": "Llama ~100M (random)"}


def figures(run: Path, client: str) -> dict | None:
    try:
        s = CLIENTS[client](run)
    except (OSError, KeyError, ValueError):
        return None
    return {k: s.get(k) for k in ("completed", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms")}


def main(out: Path) -> None:
    verdicts = {}
    print("| rep | model | client | server | completed | output tok/s | mean TTFT ms | median TTFT ms | mean TPOT ms |"
          " halffull / vLLM tok/s | TTFT ≤ vLLM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rep in sorted((p for p in out.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        for model in sorted(p.name for p in rep.iterdir() if p.is_dir()):
            for client in CLIENTS:
                f = {server: figures(rep / model / server, client) for server in ("vllm", "halffull")}
                ratio = ttft_ok = None
                if f["vllm"] and f["halffull"]:
                    ratio = f["halffull"]["output_throughput"] / f["vllm"]["output_throughput"]
                    ttft_ok = f["halffull"]["mean_ttft_ms"] <= f["vllm"]["mean_ttft_ms"]
                verdicts.setdefault((model, client), []).append(
                    ratio is not None and ratio >= TARGET.get(model, 1.0) and ttft_ok)
                for server, v in f.items():
                    if v is None:
                        print(f"| {rep.name} | {MODEL_NAMES.get(model, model)} | {client} | {server} | failed |||||||")
                        continue
                    last = (f"{ratio:.2f}x", "yes" if ttft_ok else "no") if server == "halffull" and ratio else ("", "")
                    print(f"| {rep.name} | {MODEL_NAMES.get(model, model)} | {client} | {server} | {v['completed']} | "
                          f"{v['output_throughput']:,.0f} | {v['mean_ttft_ms']:.0f} | {v['median_ttft_ms']:.0f} | "
                          f"{v['mean_tpot_ms']:.1f} | {last[0]} | {last[1]} |")
    print()
    for (model, client), ok in verdicts.items():
        print(f"- {MODEL_NAMES.get(model, model)}, {client}: target ≥{TARGET.get(model, 1.0)}x output tok/s with mean "
              f"TTFT no higher, met in {sum(ok)} of {len(ok)} repetitions")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
