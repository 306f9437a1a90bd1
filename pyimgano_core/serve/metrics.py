"""Prometheus metrics of one server (its own registry: two apps in one process stay apart)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        disable_created_metrics()  # no *_created series: they double the page and nobody graphs them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pyimgano_requests", "HTTP requests by route and status code", ["route", "code"], registry=r)
        self.errors = Counter("pyimgano_errors", "Error answers by kind", ["kind"], registry=r)
        self.latency = Histogram("pyimgano_request_latency_seconds", "Request latency (body read to answer)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("pyimgano_images_scored", "Images scored", ["model"], registry=r)
        self.flagged = Counter("pyimgano_images_flagged", "Images scored anomalous (score >= image threshold)", ["model"], registry=r)
        self.batch = Histogram("pyimgano_batch_size", "Images per forward pass", ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.queue = Gauge("pyimgano_queue_depth", "Images waiting for a forward pass", ["model"], registry=r)
        self.ready = Gauge("pyimgano_ready", "1 when every model is loaded and warmed", registry=r)

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue.labels(model=model).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
