"""Server-side figures from the Prometheus text at `{server_root}/metrics`, polled during a run.

Names are looked up under halffull's prefix and vLLM's, so the tool works against either server.
Gauges may come in several label sets (one per worker or engine): counts are summed, KV usage averaged.
halffull's per-worker counters of busy time and processed tokens give the run's load-imbalance figures.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from loadgen.metrics import worker_balance

PREFIXES = ("halffull:", "vllm:")
# series name in the report -> (metric names without prefix, in order of preference; how to combine)
GAUGES = {
    "num_requests_running": (("num_requests_running",), sum),
    "num_requests_waiting": (("num_requests_waiting",), sum),
    "kv_cache_usage_perc": (("kv_cache_usage_perc", "gpu_cache_usage_perc"), lambda v: sum(v) / len(v)),
}
PREEMPTIONS = "num_preemptions_total"
FINAL_SCRAPE_DELAY_S = 0.2
WORKER_BUSY = "halffull:worker_busy_seconds_total"
WORKER_TOKENS = "halffull:worker_processed_tokens_total"

# name, optional {labels} (label values may hold braces inside quotes), value; an optional timestamp follows.
_SAMPLE = re.compile(r'([A-Za-z_:][\w:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
_WORKER = re.compile(r'[{,]\s*(?:worker|engine)="([^"]*)"')

Metrics = dict[str, dict[str, float]]


def parse_prometheus(text: str) -> Metrics:
    """Metric name -> {label set as written: value}."""
    metrics: Metrics = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                metrics.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
            except ValueError:
                continue  # not a sample line we understand; the rest of the page is still good
    return metrics


def pick(metrics: Metrics, names: tuple[str, ...], combine) -> float | None:
    for name in names:
        for prefix in PREFIXES:
            values = metrics.get(prefix + name)
            if values:
                return float(combine(list(values.values())))
    return None


def per_worker(metrics: Metrics, name: str) -> dict[str, float]:
    """The values of one metric keyed by their worker (or engine) label."""
    out = {}
    for labels, value in metrics.get(name, {}).items():
        m = _WORKER.search(labels)
        if m:
            out[m.group(1)] = value
    return out


def counter_deltas(first: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """How much each worker's counter grew; a counter that went down was reset by a restart."""
    return {w: v - first.get(w, 0.0) if v >= first.get(w, 0.0) else v for w, v in last.items()}


class MetricsPoller:
    """Scrapes every `interval_s` from start() to stop(), on its own connection so that it neither
    waits for nor takes a slot of the benchmark's connection pool."""

    def __init__(self, url: str, interval_s: float, headers: dict[str, str]) -> None:
        self.url = url
        self.interval_s = interval_s
        self._http = httpx.AsyncClient(headers=headers, timeout=5.0)
        self._task: asyncio.Task | None = None
        self._t0 = 0.0
        self.samples: list[tuple[float, dict[str, list[float]]]] = []

    async def start(self, t0: float) -> None:
        self._t0 = t0
        if await self._scrape():  # no /metrics: skip polling rather than fail the run
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            # A server's counters may trail its last tokens (halffull's come with the workers' load
            # reports, relayed by the balancer): give the final figures a moment to land.
            await asyncio.sleep(FINAL_SCRAPE_DELAY_S)
            await self._scrape()  # so the preemption delta and the per-worker counters cover the whole run
        await self._http.aclose()
        return self.result()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._scrape()

    async def _scrape(self) -> bool:
        try:
            response = await self._http.get(self.url)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        self.samples.append((time.perf_counter() - self._t0, parse_prometheus(response.text)))
        return True

    def result(self) -> dict:
        """results.json's "server" section: per scrape, seconds since the start and each GAUGES series
        (None where the page lacked it), plus the preemptions counted during the run."""
        series = {name: [pick(m, names, combine) for _, m in self.samples]
                  for name, (names, combine) in GAUGES.items()}
        preemptions = [pick(m, (PREEMPTIONS,), sum) for _, m in self.samples]
        preemptions = [p for p in preemptions if p is not None]
        return {
            # Reachable is not enough: the page must export at least one of the figures we plot.
            "available": any(v is not None for values in series.values() for v in values),
            "url": self.url,
            "interval_s": self.interval_s,
            "t_s": [round(t, 3) for t, _ in self.samples],
            **series,
            "num_preemptions": preemptions[-1] - preemptions[0] if preemptions else None,
        }

    def load_balance(self) -> dict:
        """Per-worker busy time and processed tokens over the run and their spread (summary keys), from
        halffull's counters; empty against a server that does not export them."""
        if not self.samples:
            return {}
        first, last = self.samples[0][1], self.samples[-1][1]
        busy = counter_deltas(per_worker(first, WORKER_BUSY), per_worker(last, WORKER_BUSY))
        tokens = counter_deltas(per_worker(first, WORKER_TOKENS), per_worker(last, WORKER_TOKENS))
        workers = sorted(busy.keys() & tokens.keys(), key=lambda w: (len(w), w))
        if not workers:
            return {}
        return worker_balance([busy[w] for w in workers], [tokens[w] for w in workers])
