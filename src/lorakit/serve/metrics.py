"""Prometheus metrics of one server (its own ``CollectorRegistry``, so several servers in one process —
tests — never share counters). The engine reports through the ``observe_*``/``set_queue`` methods; the
routes count requests by adapter and HTTP status; ``GET /metrics`` renders ``exposition()``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BASE_LABEL = "base"  # the adapter label of requests without an adapter

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class ServeMetrics:
    """Every metric ``lorakit serve`` exports (names prefixed ``lorakit_serve_``)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_serve_requests", "HTTP requests answered, by adapter and status code",
                                ["adapter", "status"], registry=r)
        self.finished = Counter("lorakit_serve_finished", "Generations ended, by adapter and finish reason",
                                ["adapter", "reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_serve_prompt_tokens", "Prompt tokens prefilled", ["adapter"],
                                     registry=r)
        self.generation_tokens = Counter("lorakit_serve_generation_tokens", "Tokens generated", ["adapter"],
                                         registry=r)
        self.queue_depth = Gauge("lorakit_serve_queue_depth", "Requests waiting to join the running batch",
                                 registry=r)
        self.running = Gauge("lorakit_serve_running_batch_size", "Sequences in the running batch", registry=r)
        self.step_batch = Histogram("lorakit_serve_step_batch_size", "Sequences computed per forward step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("lorakit_serve_step_tokens", "Tokens computed per forward step",
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("lorakit_serve_time_to_first_token_seconds", "Submission to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lorakit_serve_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)

    # ------------------------------------------------------------------ engine side (worker thread)
    def observe_step(self, sequences: int, tokens: int) -> None:
        self.step_batch.observe(sequences)
        self.step_tokens.observe(tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finish(self, adapter: str | None, reason: str, prompt_tokens: int, generated: int) -> None:
        label = adapter or BASE_LABEL
        self.finished.labels(label, reason).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(generated)

    def set_queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    # ------------------------------------------------------------------ routes side
    def count_request(self, adapter: str | None, status: int) -> None:
        self.requests.labels(adapter or BASE_LABEL, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
