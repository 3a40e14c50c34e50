"""Prometheus metrics, one registry per process, handed to whoever records something."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Everything Idios counts. Create one per process (tests create many) and pass it down."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("idios_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("idios_http_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.jobs_in_flight = Gauge("idios_jobs_in_flight", "jobs a worker is running", registry=r)
        self.jobs = Counter("idios_jobs", "jobs finished by a worker", ["kind", "outcome"], registry=r)
        self.batch_size = Histogram("idios_batch_size", "items per batch", ["stage", "model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("idios_batch_seconds", "time per batch (embed: model run; write: Milvus)",
                                       ["stage", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.fetch_failures = Counter("idios_fetch_failures", "image downloads that failed", ["type"], registry=r)
        self.fetch_retries = Counter("idios_fetch_retries", "image download requests asked again after HTTP 429 "
                                     "or 503", ["status"], registry=r)
        self.engine = Gauge("idios_model_engine", "1 for the engine and precision each loaded tower runs on",
                            ["model", "tower", "engine", "precision", "device"], registry=r)
        self.queue_depth = Gauge("idios_queue_depth", "jobs waiting in the broker queue", registry=r)

    def batch_observer(self, stage: str, model: str) -> Callable[[int, float], None]:
        size = self.batch_size.labels(stage, model)
        seconds = self.batch_seconds.labels(stage, model)

        def observe(n: int, elapsed: float) -> None:
            size.observe(n)
            seconds.observe(elapsed)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)

