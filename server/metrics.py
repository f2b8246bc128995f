"""Prometheus metrics. Per-worker gauges come from the workers' latest load reports; request
latencies are measured here, where the tokens reach the client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class ReportCollector:
    """Exports the engine's state as the workers last reported it."""

    def __init__(self, client, model_name: str):
        self.client, self.model = client, model_name

    def collect(self):
        labels = ["model_name", "worker", "node"]  # node: where the worker runs ("local": on this machine)

        def family(kind, name, doc):
            return kind(name, doc, labels=labels)
        running = family(GaugeMetricFamily, "halffull:num_requests_running", "Requests in the running batch.")
        waiting = family(GaugeMetricFamily, "halffull:num_requests_waiting", "Requests waiting to be scheduled.")
        kv = family(GaugeMetricFamily, "halffull:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        free = family(GaugeMetricFamily, "halffull:kv_cache_free_blocks", "Free KV blocks.")
        total = family(GaugeMetricFamily, "halffull:kv_cache_total_blocks", "KV blocks in the pool.")
        step = family(GaugeMetricFamily, "halffull:mean_step_seconds", "Mean engine step time.")
        up = family(GaugeMetricFamily, "halffull:worker_up", "1 while the worker serves.")
        restarts = family(CounterMetricFamily, "halffull:worker_restarts", "Times the worker was restarted.")
        balancer_restarts = CounterMetricFamily("halffull:balancer_restarts", "Times the balancer was restarted.",
                                                labels=["model_name"])
        balancer_restarts.add_metric([self.model], self.client.balancer_restarts)
        in_flight = GaugeMetricFamily("halffull:num_requests_in_flight", "Requests the server is waiting on.",
                                      labels=["model_name"])
        in_flight.add_metric([self.model], self.client.in_flight())
        preempt = family(CounterMetricFamily, "halffull:num_preemptions", "Preemptions by recompute.")
        received = family(CounterMetricFamily, "halffull:worker_requests", "Requests the worker has received.")
        steps = family(CounterMetricFamily, "halffull:engine_steps", "Engine steps the worker has run.")
        busy = family(CounterMetricFamily, "halffull:worker_busy_seconds", "Time the worker has spent in engine steps.")
        processed = family(CounterMetricFamily, "halffull:worker_processed_tokens",
                           "Prompt and output tokens the worker has run through the model, recomputation included.")
        # Names that Kubernetes inference gateways scrape by default.
        gw_waiting = family(GaugeMetricFamily, "vllm:num_requests_waiting", "Alias of halffull:num_requests_waiting.")
        gw_kv = family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "Alias of halffull:kv_cache_usage_perc.")
        decisions = CounterMetricFamily("halffull:scheduler_decisions", "Scheduling policy decisions.",
                                        labels=labels + ["decision"])
        for w in self.client.workers:
            lv = [self.model, str(w.worker_id), w.node]
            up.add_metric(lv, 1.0 if w.alive else 0.0)
            restarts.add_metric(lv, w.restarts)
            r = self.client.reports.get(w.worker_id)
            if r is None:
                continue
            s = r.stats
            usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
            for fam, value in ((running, s.num_running), (waiting, s.num_waiting), (kv, usage),
                               (free, s.kv_blocks_total - s.kv_blocks_used), (total, s.kv_blocks_total),
                               (step, s.mean_step_time), (preempt, s.num_preemptions),
                               (received, r.requests_in), (steps, s.num_steps),
                               (busy, s.busy_seconds), (processed, s.processed_tokens),
                               (gw_waiting, s.num_waiting), (gw_kv, usage)):
                fam.add_metric(lv, value)
            for name, value in r.counters.items():
                decisions.add_metric(lv + [name], value)
        yield from (running, waiting, kv, free, total, step, up, restarts, balancer_restarts, in_flight, preempt,
                    received, steps, busy, processed, gw_waiting, gw_kv, decisions)


class Metrics:
    def __init__(self, client, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(ReportCollector(client, model_name))
        r, m = self.registry, ["model_name"]
        self.model = model_name
        self.prompt_tokens = Counter("halffull:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("halffull:generation_tokens", "Tokens generated.", m, registry=r)
        self.requests = Counter("halffull:request_success", "Finished requests by finish reason.",
                                m + ["finished_reason"], registry=r)
        self.rejected = Counter("halffull:request_rejected", "Requests refused over the queue limit.", m, registry=r)
        self.ttft = Histogram("halffull:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("halffull:time_per_output_token_seconds", "Mean time per output token after the first.",
                              m, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("halffull:e2e_request_latency_seconds", "End-to-end request latency.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("halffull:request_queue_time_seconds", "Arrival to first scheduled.", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.preemptions = Histogram("halffull:request_preemptions", "Preemptions per finished request.", m,
                                     buckets=(0, 1, 2, 4, 8, 16), registry=r)

    def record(self, prompt_tokens: int, output_tokens: int, reason: str, start: float, first: float | None,
               end: float, queue_s: float | None, num_preemptions: int) -> None:
        m = self.model
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(output_tokens)
        self.requests.labels(m, reason).inc()
        self.e2e.labels(m).observe(end - start)
        if first is not None:
            self.ttft.labels(m).observe(first - start)
            if output_tokens > 1:
                self.tpot.labels(m).observe((end - first) / (output_tokens - 1))
        if queue_s is not None:
            self.queue.labels(m).observe(queue_s)
        self.preemptions.labels(m).observe(num_preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
