"""The server's Prometheus metrics (`GET /metrics`), one registry per app so that several apps can live in one
process (tests, benchmarks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters, gauges and histograms the scheduler and the routes update (prometheus_client is thread-safe)."""

    def __init__(self):
        disable_created_metrics()  # the `_created` timestamps of every series are noise for a single server
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("chatglm_sft_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("chatglm_sft_requests_waiting", "Requests waiting to join the batch", registry=r)
        self.prompt_tokens = Counter("chatglm_sft_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("chatglm_sft_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "chatglm_sft_requests_finished", "Requests ended, by finish reason", ["reason"], registry=r
        )
        self.rejected = Counter(
            "chatglm_sft_requests_rejected", "Requests refused before generation, by status", ["status"], registry=r
        )
        self.ttft = Histogram(
            "chatglm_sft_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "chatglm_sft_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "chatglm_sft_batch_size", "Rows per decode step", buckets=_BATCH_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
