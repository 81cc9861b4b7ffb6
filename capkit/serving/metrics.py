"""
serve.py's counters for whoever operates it, in the Prometheus text format at GET /metrics (prometheus_client):
requests by path and status, images captioned, batch sizes, latency, queue depth, bytes in flight, and what
pressure did (refusals by reason, connections cut off, requests whose client left).

    metrics = ServerMetrics()
    metrics.watch(queue_images=lambda: ..., queue_tokens=lambda: ..., inflight_bytes=lambda: ...)
    body, content_type = metrics.exposition()
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PATHS = ("/", "/caption", "/health", "/metrics", "/docs", "/openapi.json")  # other paths count as "other"
LATENCY_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MEAN_OF = 0.2   # weight of the newest request in the running mean of /caption times (Retry-After's estimate)


class ServerMetrics:
    """One registry per app (several apps in one process, as in the tests, don't share counters)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("capkit_requests", "HTTP requests answered, by path and status (499: the client "
                                "left first)", ["path", "status"], registry=r)
        self.seconds = Histogram("capkit_caption_seconds", "POST /caption answered 200: from its headers to its "
                                 "answer", buckets=LATENCY_S, registry=r)
        self.images = Counter("capkit_images_captioned", "images through generate", registry=r)
        self.batch = Histogram("capkit_batch_images", "images per generate call", buckets=BATCH_SIZES, registry=r)
        self.refusals = Counter("capkit_refused", "requests refused under pressure, by reason (memory_budget, "
                                "queue_full, queue_timeout, body_timeout, too_large)", ["reason"], registry=r)
        self.idle_cut = Counter("capkit_idle_connections_cut", "connections closed with no request begun within "
                                "--idle_timeout_s (slowloris headers)", registry=r)
        self.vanished = Counter("capkit_vanished_requests", "requests whose client left before the answer; their "
                                "queued images were dropped", registry=r)
        self.stopped = Counter("capkit_batches_stopped", "batches ended early: every client in them had gone",
                               registry=r)
        self._mean_s = 1.0

    def watch(self, **read) -> None:
        """Gauges read when scraped: queue_images, queue_tokens, inflight_bytes (each a callable)."""
        helps = {"queue_images": "images of the requests admitted to the queue (decoding, waiting, captioned)",
                 "queue_tokens": "their work: images x beams x max_new_tokens (serve.py --max_queue_tokens)",
                 "inflight_bytes": "request-body bytes held (serve.py --max_inflight_mb)"}
        for name, fn in read.items():
            Gauge(f"capkit_{name}", helps[name], registry=self.registry).set_function(fn)

    def answered(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path if path in PATHS else "other", str(status)).inc()
        if path == "/caption" and status == 200:  # (refusals and vanished clients would skew both)
            self.seconds.observe(seconds)
            self._mean_s += MEAN_OF * (seconds - self._mean_s)

    def mean_request_s(self) -> float:
        """A running mean of successful /caption times: how long a refused client should wait."""
        return self._mean_s

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def batch_done(self, images: int) -> None:
        self.images.inc(images)
        self.batch.observe(images)

    def batch_stopped(self) -> None:
        self.stopped.inc()

    def client_left(self) -> None:
        self.vanished.inc()

    def idle_connection_cut(self) -> None:
        self.idle_cut.inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
