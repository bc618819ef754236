"""Prometheus metrics of one service instance (its own registry, so apps don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "detect", "encode")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vqa_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "vqa_queue_depth", "items waiting in a batcher", ["batcher"], registry=self.registry
        )
        self.batch_size = Histogram(
            "vqa_batch_size",
            "items per model call",
            ["batcher"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "vqa_stage_seconds",
            "latency of each stage of a request",
            ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.cache = Counter(
            "vqa_feature_cache",
            "region-feature cache lookups",
            ["result"],
            registry=self.registry,
        )
